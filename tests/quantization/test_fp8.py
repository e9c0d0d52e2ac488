"""FP8 block-scale checkpoints (quant_method "fp8", DeepSeek-V3 / Qwen3-*-FP8 layout) written here from tiny
reference models: float8_e4m3fn weights with float32 `weight_scale_inv` per block, config.json's
`quantization_config` key for key as the Hub's releases carry it. loom dequantizes them at load; the reference does
the same on a CPU, so logits and weights are compared with its load of the same files, and, where it cannot read a
layout (partial last blocks), with the format's definition computed here."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import loom
from loom.quantization.linear import Int4Linear, Int8Linear
from loomtest import reference_checkpoint

IDS = torch.tensor([[5, 17, 33, 2, 64, 8, 91, 40], [7, 7, 12, 80, 3, 55, 21, 9]])
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _blocks(shape, block):
    rows, cols = block or shape
    return -(-shape[0] // rows), -(-shape[1] // cols), rows, cols


def quantize_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale per block): scale = block amax / 448, as DeepSeek's and Qwen's exporters."""
    gr, gc, rows, cols = _blocks(w.shape, block)
    padded = torch.zeros(gr * rows, gc * cols)
    padded[:w.shape[0], :w.shape[1]] = w
    tiles = padded.reshape(gr, rows, gc, cols)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(gr * rows, gc * cols)
    return q[:w.shape[0], :w.shape[1]].contiguous(), scale.float()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The format's definition: every value times the scale of the block it lies in."""
    gr, gc, rows, cols = _blocks(q.shape, block)
    padded = torch.zeros(gr * rows, gc * cols)
    padded[:q.shape[0], :q.shape[1]] = q.float()
    w = (padded.reshape(gr, rows, gc, cols) * scale.reshape(gr, 1, gc, 1)).reshape(gr * rows, gc * cols)
    return w[:q.shape[0], :q.shape[1]]


def write_fp8(src, dst, block=(16, 16), keep=(), extra=None) -> dict[str, torch.Tensor]:
    """An FP8 copy of the float checkpoint `src`: every `*_proj.weight` not under a `keep` prefix quantized."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    for key in [k for k in tensors if k.endswith("_proj.weight") and not k.startswith(tuple(keep))]:
        tensors[key], tensors[key.replace(".weight", ".weight_scale_inv")] = quantize_fp8(tensors[key], block)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    # as Qwen3-8B-FP8's and DeepSeek-V3's config.json
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block) if block else None, **(extra or {})}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return tensors


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen3_moe"])
def family(request, tmp_path_factory):
    # Qwen3-MoE: one FP8 pair per expert projection (as Qwen3-30B-A3B-FP8), the router stays bfloat16/float
    ref_class = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[
        request.param]
    src, _ = reference_checkpoint(tmp_path_factory, request.param, ref_class)
    fp8 = tmp_path_factory.mktemp(f"{request.param}-fp8")
    return src, fp8, write_fp8(src, fp8)


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")[0]


def _reference(path, **kw):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_loads_dequantized_with_the_reference_logits(family, caplog):
    _, path, stored = family
    with caplog.at_level("WARNING", logger="loom"):
        model = loom.AutoModelForCausalLM.from_pretrained(path)
    warned = [r.getMessage() for r in caplog.records if "FP8" in r.getMessage()]
    count = sum(k.endswith("weight_scale_inv") for k in stored)
    assert len(warned) == 1 and f"{count} FP8 Linear weights" in warned[0] and "torch.float32" in warned[0]
    ref = _reference(path, dtype=torch.float32)  # the reference dequantizes too on a CPU
    assert not hasattr(model.config, "quantization_config")
    ref_weights = ref.state_dict()  # the reference's MoE experts are fused 3-D tensors: compared by the logits
    for key in [k for k in stored if k.endswith("weight_scale_inv")]:
        name = key.removesuffix(".weight_scale_inv")
        ours = model.get_submodule(name).weight
        want = dequantize_fp8(stored[f"{name}.weight"], stored[key], (16, 16))
        assert ours.dtype == torch.float32 and torch.equal(ours, want), name
        assert torch.equal(ref_weights.get(f"{name}.weight", want), want), name
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-5, rtol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert model.generate(IDS, **kw).tolist() == ref.generate(IDS, **kw).tolist()


def test_dtype_bfloat16_matches_the_reference(family):
    _, path, _ = family
    # the reference's CPU recipe passes FineGrainedFP8Config(dequantize=True): accepted, loom dequantizes anyway
    model = loom.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                      quantization_config=loom.FineGrainedFP8Config(dequantize=True))
    ref = _reference(path, dtype=torch.bfloat16)
    ours = model.state_dict()
    assert "model.layers.1.self_attn.o_proj.weight" in ours
    for name, t in ref.state_dict().items():  # the reference's fused MoE experts: compared by the logits
        assert t.dtype == torch.bfloat16 and torch.equal(ours.get(name, t), t), name
    torch.testing.assert_close(_logits(model), _logits(ref), atol=2e-2, rtol=2e-2)  # bfloat16 math


def test_save_writes_float_weights_the_reference_loads(family, tmp_path):
    _, path, _ = family
    model = loom.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in config
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert not any(k.endswith("weight_scale_inv") for k in saved) and {t.dtype for t in saved.values()} == {
        torch.float32}
    ref = _reference(tmp_path / "saved", dtype=torch.float32)
    again = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(again), _logits(model))
    torch.testing.assert_close(_logits(ref), _logits(model), atol=1e-5, rtol=1e-5)


def test_partial_last_blocks_follow_the_format(llama_src, tmp_path):
    # DeepSeek-V3's kv_a_proj_with_mqa has 576 rows in blocks of 128: the last block row is partial. Here 48-wide
    # MLP dims in blocks of 32. The reference 5.25 reads the block size off the scale grid (48 rows / 2 = 24), so
    # gets those weights wrong (up to 0.012 off here): the weights are checked against the definition.
    stored = write_fp8(llama_src, tmp_path / "fp8", block=(32, 32))
    model = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"):
        want = dequantize_fp8(stored[f"{name}.weight"], stored[f"{name}.weight_scale_inv"], (32, 32))
        assert torch.equal(model.get_submodule(name).weight, want), name


def test_one_scale_per_tensor_and_ue8m0_scales(llama_src, tmp_path):
    stored = write_fp8(llama_src, tmp_path / "tensor", block=None)
    model = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "tensor")
    name = "model.layers.1.mlp.up_proj"
    assert stored[f"{name}.weight_scale_inv"].shape == (1, 1)
    want = dequantize_fp8(stored[f"{name}.weight"], stored[f"{name}.weight_scale_inv"], None)
    assert torch.equal(model.get_submodule(name).weight, want)
    torch.testing.assert_close(_logits(model), _logits(_reference(tmp_path / "tensor", dtype=torch.float32)),
                               atol=1e-5, rtol=1e-5)
    # ue8m0 (DeepSeek-V3.1-style power-of-two scales) stored as exponent bytes: scale = 2 ** (byte - 127)
    tensors = dict(stored)
    for key in [k for k in tensors if k.endswith("weight_scale_inv")]:
        tensors[key] = (torch.log2(tensors[key]).ceil() + 127).to(torch.uint8)
    shutil.copytree(tmp_path / "tensor", tmp_path / "ue8m0")
    save_file(tensors, tmp_path / "ue8m0" / "model.safetensors", metadata={"format": "pt"})
    _edit_config(tmp_path / "ue8m0", scale_fmt="ue8m0")
    model = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "ue8m0")
    byte = tensors[f"{name}.weight_scale_inv"]
    want = stored[f"{name}.weight"].float() * 2.0 ** (byte.float() - 127)
    assert torch.equal(model.get_submodule(name).weight, want)
    torch.testing.assert_close(_logits(model), _logits(_reference(tmp_path / "ue8m0", dtype=torch.float32)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(getattr(torch, "float8_e8m0fnu", None) is None, reason="this torch has no float8_e8m0fnu")
def test_ue8m0_scales_stored_as_f8_e8m0(llama_src, tmp_path):
    """Block scales in safetensors' F8_E8M0 dtype (torch.float8_e8m0fnu, exponent-only: 2 ** (byte - 127)) load
    as the same power-of-two scales stored as exponent bytes, through both the mapped and the eager reader."""
    from loom.loading import SafetensorsReader

    stored = write_fp8(llama_src, tmp_path / "fp8", block=(16, 16), extra={"scale_fmt": "ue8m0"})
    tensors = dict(stored)
    for key in [k for k in tensors if k.endswith("weight_scale_inv")]:
        tensors[key] = (torch.log2(tensors[key]).ceil() + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    name = "model.layers.0.mlp.down_proj"
    reader = SafetensorsReader(tmp_path / "fp8" / "model.safetensors")
    assert torch.equal(reader.get_tensor(f"{name}.weight_scale_inv").view(torch.uint8),
                       tensors[f"{name}.weight_scale_inv"].view(torch.uint8))
    model = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    byte = tensors[f"{name}.weight_scale_inv"].view(torch.uint8)
    want = dequantize_fp8(stored[f"{name}.weight"], 2.0 ** (byte.float() - 127), (16, 16))
    assert torch.equal(model.get_submodule(name).weight, want)
    as_bytes = {k: v.view(torch.uint8) if v.dtype == torch.float8_e8m0fnu else v for k, v in tensors.items()}
    save_file(as_bytes, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(_logits(model), _logits(loom.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")))


@pytest.mark.parametrize("key", ["modules_to_not_convert", "ignored_layers"])
def test_modules_to_not_convert_load_as_stored(llama_src, tmp_path, key):
    keep = ["model.layers.1.mlp"]
    stored = write_fp8(llama_src, tmp_path / "fp8", keep=keep, extra={key: ["lm_head"] + keep})
    model = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, stored["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(_logits(model), _logits(_reference(tmp_path / "fp8", dtype=torch.float32)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [loom.WeightOnlyConfig(), loom.WeightOnlyConfig(bits=4, group_size=16,
                                                                                  symmetric=True)])
def test_weight_only_config_quantizes_the_dequantized_weights(llama_src, tmp_path, config):
    write_fp8(llama_src, tmp_path / "fp8")
    model = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", quantization_config=config)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear if config.bits == 8 else Int4Linear)
    assert model.config.quantization_config == config
    # the same as quantizing the float model the FP8 checkpoint dequantizes to
    loom.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8").save_pretrained(tmp_path / "float")
    want = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    for name, t in want.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    assert torch.equal(_logits(model), _logits(want))
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"


# -- bad input ---------------------------------------------------------------------------------------------------
def _edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(fields)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def fp8_dir(llama_src, tmp_path):
    write_fp8(llama_src, tmp_path / "fp8")
    return tmp_path / "fp8"


def _resave(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_scale_is_named(fp8_dir):
    _resave(fp8_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale_inv"))
    with pytest.raises(ValueError, match=r"FP8 checkpoint lacks model\.layers\.1\.mlp\.up_proj\.weight_scale_inv"):
        loom.AutoModelForCausalLM.from_pretrained(fp8_dir)


def test_block_size_that_does_not_match_the_scales_is_named(fp8_dir):
    _edit_config(fp8_dir, weight_block_size=[32, 16])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\w+\.\w+_proj\.weight_scale_inv: holds \(\d+, \d+\) "
                                         r"scales, but .* blocks of 32x16 \(weight_block_size\)"):
        loom.AutoModelForCausalLM.from_pretrained(fp8_dir)


@pytest.mark.parametrize("field,value,message", [
    ("activation_scheme", "static", "activation_scheme='static' is not supported"),
    ("weight_block_size", [128], r"weight_block_size=\[128\] must be \[rows, cols\]"),
    ("scale_fmt", "e5m2", "scale_fmt='e5m2' is not supported"),
    ("expert_dtype", "fp4", "expert_dtype='fp4' is not supported"),
])
def test_unsupported_config_fields_are_named(fp8_dir, field, value, message):
    _edit_config(fp8_dir, **{field: value})
    with pytest.raises(ValueError, match=f"quantization_config.{message}"):
        loom.AutoModelForCausalLM.from_pretrained(fp8_dir)


def test_fp8_weight_in_a_module_not_to_convert_is_named(fp8_dir):
    _edit_config(fp8_dir, modules_to_not_convert=["model.layers.0.mlp.up_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: stored in torch\.float8_e4m3fn, "
                                         "but quantization_config.modules_to_not_convert lists it"):
        loom.AutoModelForCausalLM.from_pretrained(fp8_dir)


def test_float_weight_with_a_scale_is_named(fp8_dir):
    def unquantize(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].float()

    _resave(fp8_dir, unquantize)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight\w*: .*float"):
        loom.AutoModelForCausalLM.from_pretrained(fp8_dir)


def test_torch_without_float8_is_named(fp8_dir, monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(RuntimeError, match=r"torch \S+ has no float8 dtypes .* upgrade torch"):
        loom.AutoModelForCausalLM.from_pretrained(fp8_dir)


def test_fp8_config_cannot_quantize_a_float_checkpoint(llama_src):
    with pytest.raises(ValueError, match="FineGrainedFP8Config describes a checkpoint that is already quantized"):
        loom.AutoModelForCausalLM.from_pretrained(llama_src, quantization_config=loom.FineGrainedFP8Config())


def test_default_dtype_is_the_checkpoints(tmp_path):
    # Hub FP8 checkpoints keep their other tensors in bfloat16 and say so in config.json: with no dtype= the
    # dequantized weights take that dtype too, as in the reference
    import transformers

    from loomtest import TINY

    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY["qwen3"])).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16")
    write_fp8(tmp_path / "bf16", tmp_path / "fp8")
    model = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    ref = _reference(tmp_path / "fp8")
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, t in ref.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(model.state_dict()[name], t), name
    torch.testing.assert_close(_logits(model), _logits(ref), atol=2e-2, rtol=2e-2)  # bfloat16 math


def test_streams_one_weight_at_a_time(fp8_dir, monkeypatch):
    # safetensors lays tensors out by dtype alignment, so the float32 scales come before the fp8 weights: each
    # weight finds its scale waiting and is dequantized as it is read; no fp8 weight waits for anything. No mapping
    # of the file outlives the load either, so the fp8 pages are not kept resident beside the float model.
    from loom.quantization.fp8 import FP8Quantizer

    waiting = []
    collect = FP8Quantizer._collect

    def counting(self, *args):
        collect(self, *args)
        waiting.append(sum("weight" in t for t in self._pending.values()))

    monkeypatch.setattr(FP8Quantizer, "_collect", counting)
    loom.AutoModelForCausalLM.from_pretrained(fp8_dir)
    assert len(waiting) == 28 and max(waiting) == 0
    assert not any(str(fp8_dir) in line for line in open("/proc/self/maps"))


# -- placement: device_map and tensor parallelism ----------------------------------------------------------------
_SPLIT_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"": "cpu"}, "split-with-disk"])
def test_device_map_places_the_dequantized_weights(fp8_dir, tmp_path, device_map):
    """device_map strings and dicts (one layer offloaded to disk) give the logits of a plain load; the offloaded
    layer's weights are the dequantized float32 ones, written to offload_folder."""
    plain = loom.AutoModelForCausalLM.from_pretrained(fp8_dir)
    kwargs = {"device_map": device_map}
    if device_map == "split-with-disk":
        kwargs = {"device_map": _SPLIT_MAP, "offload_folder": str(tmp_path / "offload")}
    model = loom.AutoModelForCausalLM.from_pretrained(fp8_dir, **kwargs)
    assert torch.equal(_logits(model), _logits(plain))
    if device_map == "split-with-disk":
        assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # on disk until its forward
        saved = sorted(p.name for p in (tmp_path / "offload").iterdir())
        assert "model.layers.1.mlp.up_proj.weight.dat" in saved and not any("scale_inv" in p for p in saved)
    else:
        assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.float32


def test_tp_plan_auto_on_two_processes_dequantizes_each_shard(fp8_dir, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
    import dist_helpers as H

    H.launch(2, tmp_path, "fp8_tp", str(fp8_dir), script="fp8_tp_script.py", timeout=300, dist_timeout=120.0)
    got = torch.load(tmp_path / "fp8_tp.pt", weights_only=False)
    model = loom.AutoModelForCausalLM.from_pretrained(fp8_dir).eval()
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(got["tokens"], model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    q, o = model.model.layers[0].self_attn.q_proj.weight.shape, model.model.layers[0].self_attn.o_proj.weight.shape
    # colwise q_proj splits the output rows, rowwise o_proj the input columns: each rank holds half
    assert got["shapes"] == [{"q_proj": (q[0] // 2, q[1]), "o_proj": (o[0], o[1] // 2)}] * 2
