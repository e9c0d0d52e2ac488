"""from_pretrained / save_pretrained: round trips, interop with the reference, sharding, legacy files, the HF cache
layout, dtypes, device maps, key handling, and every bad input with its message."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import loom
from loomtest import reference_checkpoint


def _ids(B=2, T=10, seed=0):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "gpt2", "GPT2LMHeadModel")


def test_roundtrip_exact_and_byte_identical_resave(llama_ckpt, tmp_path):
    path, _ = llama_ckpt
    m = loom.AutoModelForCausalLM.from_pretrained(path)
    m.save_pretrained(tmp_path / "a")
    m2 = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    m2.save_pretrained(tmp_path / "b")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("fixture", ["llama_ckpt", "gpt2_ckpt"])
def test_interop_loom_saved_loads_in_reference(fixture, request, tmp_path):
    import transformers

    path, ref = request.getfixturevalue(fixture)
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    ours.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    saved = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in saved or fixture == "llama_ckpt"  # GPT-2's tied head is stored once


def test_forced_sharding(llama_ckpt, tmp_path):
    path, ref = llama_ckpt
    m = loom.LlamaForCausalLM.from_pretrained(path)
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in m.state_dict().values())
    again = loom.LlamaForCausalLM.from_pretrained(tmp_path)
    import transformers

    ref2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, m(ids).logits, atol=0, rtol=0)  # the round trip is lossless
        torch.testing.assert_close(ref2(ids).logits, ref(ids).logits, atol=0, rtol=0)
        # loom's C RMSNorm sums squares in another order than torch: last-bit differences
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, atol=1e-6, rtol=1e-5)
    # re-saving unsharded removes the stale shards and the index
    again.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    assert not [f for f in tmp_path.iterdir() if "-of-" in f.name]


def test_reference_sharded_checkpoint_loads(tmp_path_factory, tmp_path):
    import transformers

    path, ref = reference_checkpoint(tmp_path_factory, "gpt2", "GPT2LMHeadModel")
    ref.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = loom.GPT2LMHeadModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_bin_fallback(llama_ckpt, tmp_path):
    path, ref = llama_ckpt
    state = load_file(path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    ours = loom.LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_legacy_format_bin_loads(llama_ckpt, tmp_path):
    """A pytorch_model.bin in the pre-zipfile format (which cannot be mmap'd) loads, as in the reference."""
    path, ref = llama_ckpt
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    ours = loom.LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("zipfile", [True, False])
def test_bin_with_pickled_objects_is_refused(llama_ckpt, tmp_path, zipfile):
    path, _ = llama_ckpt
    shutil.copy(path / "config.json", tmp_path / "config.json")
    torch.save({"model.norm.weight": torch.ones(32), "evil": _Pickled()}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(OSError, match=r"pickles the Python object .*_Pickled besides tensors; loom refuses to unpickle "
                                      r"it, as unpickling can run arbitrary code \(torch.load\(weights_only=True\)"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("zipfile", [True, False])
def test_corrupt_bin_is_called_corrupt(llama_ckpt, tmp_path, zipfile):
    path, ref = llama_ckpt
    shutil.copy(path / "config.json", tmp_path / "config.json")
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(OSError, match=r"pytorch_model.bin is not a readable PyTorch checkpoint \(.*\); it may be "
                                      "truncated or corrupt") as e:
        loom.LlamaForCausalLM.from_pretrained(tmp_path)
    assert "arbitrary code" not in str(e.value) and "trust" not in str(e.value)


class _Pickled:
    pass


def _rewrite_header(file, edit) -> None:
    """Apply `edit(header)` to a safetensors file's JSON header, keeping its data bytes."""
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _overlap(header):  # q_proj of layer 1 reads the bytes of layer 0's: same size, so only the offsets tell
    header["model.layers.1.self_attn.q_proj.weight"]["data_offsets"] = \
        header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"]


def _wrong_size(header):  # a float16 tensor over float32 bytes
    header["model.layers.0.self_attn.q_proj.weight"]["dtype"] = "F16"


@pytest.mark.parametrize("edit", [_overlap, _wrong_size])
@pytest.mark.parametrize("quantized", [True, False])
def test_inconsistent_safetensors_header_is_refused(llama_ckpt, tmp_path, edit, quantized):
    """Every reader validates the header as safetensors does, the plain-reads one of quantize-on-load included."""
    path, _ = llama_ckpt
    shutil.copy(path / "config.json", tmp_path)
    shutil.copy(path / "model.safetensors", tmp_path)
    _rewrite_header(tmp_path / "model.safetensors", edit)
    kwargs = {"quantization_config": loom.WeightOnlyConfig(bits=8)} if quantized else {}
    with pytest.raises(OSError, match=f"{tmp_path / 'model.safetensors'} is not a readable safetensors file "
                                      r"\(.*invalid .*offset"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path, **kwargs)


def test_hf_cache_layout_offline(llama_ckpt, tmp_path, monkeypatch):
    path, ref = llama_ckpt
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in path.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(f"../../blobs/{f.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = loom.AutoModelForCausalLM.from_pretrained("acme/tiny-llama")
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)
    assert loom.AutoConfig.from_pretrained("acme/tiny-llama", revision="abc123").hidden_size == 32
    with pytest.raises(OSError, match="could not find config.json for 'acme/other'.*offline"):
        loom.AutoModel.from_pretrained("acme/other")


def test_packaged_minilm_by_hub_id():
    m = loom.AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    assert m.config.hidden_size == 384 and m.num_parameters() > 22_000_000


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "float16"])
def test_dtype_argument(llama_ckpt, dtype):
    path, _ = llama_ckpt
    m = loom.LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert all(p.dtype == want for p in m.parameters())
    assert m(_ids()).logits.dtype == want


def test_auto_dtype_and_torch_dtype_alias(llama_ckpt, tmp_path):
    path, _ = llama_ckpt
    m = loom.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    auto = loom.LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert auto.dtype == torch.bfloat16
    default = loom.LlamaForCausalLM.from_pretrained(tmp_path)
    assert default.dtype == torch.bfloat16  # checkpoint's dtype, as the reference's 5.x default "auto"
    f32 = loom.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert f32.dtype == torch.float32


def test_bad_dtype_string(llama_ckpt):
    with pytest.raises(ValueError, match="dtype='float33' is not a dtype"):
        loom.LlamaForCausalLM.from_pretrained(llama_ckpt[0], dtype="float33")


def test_base_checkpoint_into_head_and_back(tmp_path_factory):
    import transformers

    base_path, base_ref = reference_checkpoint(tmp_path_factory, "bert", "BertModel")
    with pytest.warns(UserWarning, match="newly initialised.*classifier"):
        head, info = loom.BertForSequenceClassification.from_pretrained(base_path, num_labels=3,
                                                                         output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert all("pooler" not in k for k in info["unexpected_keys"])
    assert torch.equal(head.bert.embeddings.word_embeddings.weight, base_ref.embeddings.word_embeddings.weight)
    assert head.classifier.weight.abs().sum() > 0 and torch.all(head.classifier.bias == 0)
    head_path, head_ref = reference_checkpoint(tmp_path_factory, "bert", "BertForTokenClassification")
    base = loom.BertModel.from_pretrained(head_path)
    assert torch.equal(base.encoder.layer[0].output.dense.weight, head_ref.bert.encoder.layer[0].output.dense.weight)


def test_legacy_gamma_beta_names(tmp_path_factory, tmp_path):
    path, ref = reference_checkpoint(tmp_path_factory, "bert", "BertModel")
    state = load_file(path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    renamed["embeddings.position_ids"] = torch.arange(64)[None]
    save_file(renamed, tmp_path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path)
    _, info = loom.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()


def test_mismatched_sizes(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "bert", "BertForSequenceClassification", num_labels=2)
    with pytest.raises(ValueError, match=r"(?s)size mismatch.*classifier.weight: checkpoint \(2, 32\) vs model \(5, 32\)"
                                         r"(.|\n)*ignore_mismatched_sizes=True"):
        loom.BertForSequenceClassification.from_pretrained(path, num_labels=5)
    with pytest.warns(UserWarning, match="shape mismatch"):
        m, info = loom.BertForSequenceClassification.from_pretrained(path, num_labels=5, ignore_mismatched_sizes=True,
                                                                      output_loading_info=True)
    assert m.classifier.weight.shape == (5, 32) and len(info["mismatched_keys"]) == 2


def test_missing_weights_file(tmp_path):
    loom.LlamaConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(OSError, match="no weights found.*model.safetensors"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors(llama_ckpt, tmp_path):
    path, _ = llama_ckpt
    shutil.copytree(path, tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(OSError, match=r"model.safetensors.*(truncated or corrupt)"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path / "c")


def test_non_directory_path(llama_ckpt):
    with pytest.raises(NotADirectoryError, match="pass the directory"):
        loom.AutoModelForCausalLM.from_pretrained(llama_ckpt[0] / "config.json")


def test_nonexistent_path():
    with pytest.raises(OSError, match="neither an existing directory nor a hub id"):
        loom.AutoModel.from_pretrained("./no/such/dir/here")


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "a/../../x.safetensors"])
def test_index_escaping_directory_is_refused(llama_ckpt, tmp_path, evil):
    path, _ = llama_ckpt
    shutil.copy(path / "config.json", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": evil}}))
    with pytest.raises(OSError, match="lies outside"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path)


def test_missing_shard(llama_ckpt, tmp_path):
    path, _ = llama_ckpt
    shutil.copy(path / "config.json", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-0001.safetensors"}}))
    with pytest.raises(OSError, match="lists the shard model-0001.safetensors, which is missing"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path)


def test_save_refuses_pickle_and_files(llama_ckpt, tmp_path):
    m = loom.LlamaForCausalLM.from_pretrained(llama_ckpt[0])
    with pytest.raises(ValueError, match="safetensors only"):
        m.save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        m.save_pretrained(tmp_path / "f")


def test_device_map_dict_and_cpu(llama_ckpt):
    path, ref = llama_ckpt
    for dm in ("cpu", {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}):
        m = loom.LlamaForCausalLM.from_pretrained(path, device_map=dm)
        with torch.no_grad():
            torch.testing.assert_close(m(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="device_map has no entry for lm_head.weight"):
        loom.LlamaForCausalLM.from_pretrained(path, device_map={"model": "cpu"})
    with pytest.raises(ValueError, match="device_map='nowhere'"):
        loom.LlamaForCausalLM.from_pretrained(path, device_map="nowhere")


def test_device_map_auto_with_disk_offload(llama_ckpt, tmp_path):
    path, ref = llama_ckpt
    m = loom.LlamaForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": 80_000},
                                              offload_folder=str(tmp_path))
    assert "disk" in set(m.hf_device_map.values()) and "cpu" in set(m.hf_device_map.values())
    with torch.no_grad():
        torch.testing.assert_close(m(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_resize_token_embeddings(llama_ckpt):
    m = loom.LlamaForCausalLM.from_pretrained(llama_ckpt[0])
    before = m.model.embed_tokens.weight.detach().clone()
    m.resize_token_embeddings(110, pad_to_multiple_of=8)
    assert m.model.embed_tokens.weight.shape == (112, 32) and m.lm_head.weight.shape == (112, 32)
    assert torch.equal(m.model.embed_tokens.weight[:99], before) and m.config.vocab_size == 112
    assert m(torch.tensor([[111, 5]])).logits.shape == (1, 2, 112)


def test_gradient_checkpointing_same_grads(llama_ckpt):
    m = loom.LlamaForCausalLM.from_pretrained(llama_ckpt[0]).train()
    ids = _ids()
    m(ids, labels=ids).loss.backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing_enable()
    assert m.is_gradient_checkpointing
    m(ids, labels=ids).loss.backward()
    for a, p in zip(g1, m.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_device_map_auto_too_small(llama_ckpt, tmp_path):
    with pytest.raises(ValueError, match="leaves no room"):
        loom.LlamaForCausalLM.from_pretrained(llama_ckpt[0], device_map="auto", max_memory={"cpu": 100},
                                              offload_folder=str(tmp_path))


def test_variant_and_subfolder(llama_ckpt, tmp_path):
    path, ref = llama_ckpt
    m = loom.LlamaForCausalLM.from_pretrained(path)
    m.save_pretrained(tmp_path / "sub", variant="v2")
    assert (tmp_path / "sub" / "model.v2.safetensors").exists()
    again = loom.AutoModelForCausalLM.from_pretrained(tmp_path, subfolder="sub", variant="v2")
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(OSError, match="model.v3.safetensors"):
        loom.AutoModelForCausalLM.from_pretrained(tmp_path, subfolder="sub", variant="v3")


def test_loaded_model_is_in_eval_mode_and_has_generation_config(llama_ckpt):
    m = loom.AutoModelForCausalLM.from_pretrained(llama_ckpt[0])
    assert not m.training and m.generation_config.eos_token_id == 2


def test_packaged_model_never_goes_online(monkeypatch):
    from loom.hub import resolve_file

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("tried the network for a packaged model")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    assert resolve_file("sentence-transformers/all-MiniLM-L6-v2", "chat_template.jinja", required=False) is None
    assert resolve_file("sentence-transformers/all-MiniLM-L6-v2", "config.json").name == "config.json"


def test_device_map_auto_keeps_variant_layers_whole(tmp_path_factory, tmp_path):
    """A variant's own layer class (Qwen2DecoderLayer, a LlamaDecoderLayer) is never split across devices."""
    import re

    from loomtest import reference_checkpoint

    path, ref = reference_checkpoint(tmp_path_factory, "qwen2", "Qwen2ForCausalLM", num_hidden_layers=4)
    for budget in (80_000, 100_000, 120_000):
        m = loom.Qwen2ForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": budget},
                                                  offload_folder=str(tmp_path / str(budget)))
        assert "disk" in set(m.hf_device_map.values())
        split = [k for k in m.hf_device_map if "layers." in k and not re.fullmatch(r"model\.layers\.\d+", k)]
        assert split == [], m.hf_device_map
        with torch.no_grad():
            torch.testing.assert_close(m(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_head_bias_missing_from_a_base_checkpoint_starts_at_zero(tmp_path):
    """BertForMaskedLM from a BertModel checkpoint: the MLM bias is not in the file; it starts at zero as in the
    reference (it once held whatever the allocator returned, values up to 1e12)."""
    import transformers

    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37)
    transformers.BertModel(config).save_pretrained(tmp_path)
    for _ in range(3):
        model = loom.BertForMaskedLM.from_pretrained(tmp_path)
        assert torch.equal(model.cls.predictions.bias, torch.zeros(99))


@pytest.mark.parametrize("cls", ["BertForMaskedLM", "MPNetForMaskedLM", "DistilBertForMaskedLM"])
def test_resize_token_embeddings_grows_a_bias_kept_beside_the_head(tmp_path, cls):
    import transformers

    model_type = {"BertForMaskedLM": "bert", "MPNetForMaskedLM": "mpnet", "DistilBertForMaskedLM": "distilbert"}[cls]
    from loomtest import TINY

    torch.manual_seed(0)
    getattr(transformers, cls)(transformers.AutoConfig.for_model(model_type, **TINY[model_type])).save_pretrained(tmp_path)
    model = getattr(loom, cls).from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
        model.resize_token_embeddings(110)
        after = model(torch.tensor([[5, 6, 7]])).logits
    assert after.shape == (1, 3, 110)
    torch.testing.assert_close(after[..., :99], before)
