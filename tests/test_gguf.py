"""GGUF models: `from_pretrained(dir, gguf_file=...)` gives the reference's logits on the same file (which expands
everything to float32), for Llama (q/k permuted by llama.cpp's converter), Mistral, Qwen 2 (biases) and Qwen 3
(q/k norms, stated head size), for float and quantized tensor types; Q4_0 Linears stay 4-bit and Q8_0 Linears 8-bit
(group 32) with the file's values exactly; bad input gets errors that name the file, the architecture or the
package."""
from __future__ import annotations

import json

import logging
import sys

import pytest
import torch

pytest.importorskip("gguf", reason="the GGUF tests write their files with the gguf package (pip install gguf)")

from ggufwrite import save, write_gguf  # noqa: E402
from loomtest import reference_checkpoint  # noqa: E402

import loom  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 22, 40, 3, 77, 12], [4, 4, 8, 15, 16, 23, 42, 98]])
# dimensions that are multiples of llama.cpp's 32-value blocks, so every Linear can be quantized
BLOCKS = dict(intermediate_size=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, model = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM", **BLOCKS)
    for kind in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"):
        write_gguf(path / f"tiny-{kind}.gguf", model, "llama", kind)
    write_gguf(path / "mistral.gguf", model, "llama", name="mistral")
    return path, model


def _reference(folder, name, **kwargs):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs).eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_llama_logits_equal_the_reference_on_the_same_file(llama, kind):
    folder, original = llama
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"tiny-{kind}.gguf")
    assert ours.dtype == torch.float32  # the reference's default for every GGUF
    # Q4_0 and Q8_0 run on loom's int4 / group-wise int8 kernels, exact up to the int16 rounding of the activations
    tol = 1e-4 if kind in ("Q4_0", "Q8_0") else 1e-5
    torch.testing.assert_close(_logits(ours), _logits(_reference(folder, f"tiny-{kind}.gguf")), atol=tol, rtol=tol)
    if kind == "F32":  # the permutation undone: the very model that was written
        torch.testing.assert_close(_logits(ours), _logits(original), atol=1e-5, rtol=1e-5)


def test_q4_0_and_q8_0_linears_stay_quantized_and_other_types_are_expanded_with_a_warning(llama, caplog):
    folder, _ = llama
    with caplog.at_level(logging.WARNING, logger="loom"):
        q4 = loom.LlamaForCausalLM.from_pretrained(folder, gguf_file="tiny-Q4_0.gguf")
        q8 = loom.LlamaForCausalLM.from_pretrained(folder, gguf_file="tiny-Q8_0.gguf")
    linears = [m for name, m in q4.named_modules() if name.endswith(("_proj", "lm_head"))]
    assert linears and all(type(m).__name__ == "Int4Linear" and m.group_size == 32 and not m.asymmetric
                           for m in linears)
    linears = [m for name, m in q8.named_modules() if name.endswith(("_proj", "lm_head"))]
    assert len(linears) == 15 and all(type(m).__name__ == "Int8GroupLinear" and m.group_size == 32
                                      and m.weight_scale.dtype == torch.float16 for m in linears)
    assert "dequantized" not in caplog.text  # the embeddings and norms of these files are F32
    with caplog.at_level(logging.WARNING, logger="loom"):
        q5 = loom.LlamaForCausalLM.from_pretrained(folder, gguf_file="tiny-Q5_0.gguf")
    assert "15 Q5_0 tensors are dequantized" in caplog.text and "(0 kept 4-bit, 0 kept 8-bit)" in caplog.text
    assert not any(type(m).__name__.startswith("Int") for m in q5.modules())


def test_q8_0_weights_are_the_files_values_and_greedy_tokens_match(llama):
    """q * d exactly as the file defines it (the reference expands Q8_0 to float32 the same way), and on the kernel
    the greedy continuation is the reference's."""
    from loom.quantization.linear import dequantized_weight

    folder, _ = llama
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q8_0.gguf")
    ref = _reference(folder, "tiny-Q8_0.gguf")
    for name, module in ours.named_modules():
        if type(module).__name__ == "Int8GroupLinear":
            assert torch.equal(dequantized_weight(module), ref.get_submodule(name).weight), name
    kwargs = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert torch.equal(ours.generate(IDS, **kwargs), ref.generate(IDS, **kwargs))
    # the config in memory says what the model holds (and saves with): int8, group 32, not the int4 template
    groups = ours.config.quantization_config.to_dict()["config_groups"]
    assert [g["weights"]["num_bits"] for g in groups.values()] == [8]


def test_q8_0_logits_are_the_same_bits_with_the_kernels_off(llama, monkeypatch):
    """loom::int8_group_linear's torch path is the C kernel's arithmetic: LOOM_KERNELS=off changes no bit."""
    from loomtest import kernels_off_for

    folder, _ = llama
    on = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q8_0.gguf")
    kernels_off_for(monkeypatch)
    off = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q8_0.gguf")
    assert off.lm_head.kernel == "torch"
    assert torch.equal(_logits(on), _logits(off))


def test_q8_0_model_saves_as_compressed_tensors_int8_group_32(llama, tmp_path):
    """pack-quantized int8, group 32, float32 scales (the float16 d widened exactly): loom reloads the same
    Int8GroupLinears (same bits), the reference (compressed-tensors) the same values."""
    import transformers

    folder, _ = llama
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q8_0.gguf")
    ours.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert [g["weights"]["num_bits"] for g in qc["config_groups"].values()] == [8]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    again = loom.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.lm_head).__name__ == "Int8GroupLinear" and again.lm_head.weight_scale.dtype == torch.float16
    assert torch.equal(_logits(again), _logits(ours))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=1e-4, rtol=1e-4)


def test_mixed_q4_0_and_q8_0_file_keeps_both_and_saves_two_schemes(llama, tmp_path):
    """llama.cpp's Q4_0 files often keep some tensors in Q8_0: each Linear takes its own kernel, and the saved
    compressed-tensors config names each module's scheme."""
    import gguf

    folder, _ = llama
    reader = gguf.GGUFReader(str(folder / "tiny-Q8_0.gguf"))
    q8 = {t.name: (t.data.copy(), t.tensor_type) for t in reader.tensors if t.name.startswith("blk.1.")}
    _rewritten(folder / "tiny-Q4_0.gguf", folder / "mixed.gguf", tensors=q8)
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="mixed.gguf")
    assert type(ours.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"
    assert type(ours.model.layers[1].mlp.up_proj).__name__ == "Int8GroupLinear"
    torch.testing.assert_close(_logits(ours), _logits(_reference(folder, "mixed.gguf")), atol=1e-4, rtol=1e-4)
    ours.save_pretrained(tmp_path)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert "model.layers.1.mlp.up_proj" in bits[8] and "model.layers.0.mlp.up_proj" in bits[4]
    again = loom.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.model.layers[1].mlp.up_proj).__name__ == "Int8GroupLinear"
    assert torch.equal(_logits(again), _logits(ours))


def test_q4_0_weights_are_the_files_values(llama, monkeypatch):
    """The int4 layout holds exactly the file's values: on the torch path (no C kernel) logits match the
    reference's float32 expansion to float32 rounding."""
    from loomtest import kernels_off_for

    kernels_off_for(monkeypatch)
    folder, _ = llama
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q4_0.gguf")
    torch.testing.assert_close(_logits(ours), _logits(_reference(folder, "tiny-Q4_0.gguf")), atol=1e-5, rtol=1e-5)


def test_q4_0_model_saves_and_reloads_as_loom_int4(llama, tmp_path):
    folder, _ = llama
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q4_0.gguf")
    ours.save_pretrained(tmp_path)
    again = loom.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.lm_head).__name__ == "Int4Linear"
    torch.testing.assert_close(_logits(again), _logits(ours), atol=0, rtol=0)
    # symmetric int4 in groups of 32 saves as compressed-tensors, which other tools read
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"


def test_float16_file_loads_in_the_requested_dtype(llama):
    folder, _ = llama
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-F16.gguf", dtype=torch.float16)
    assert ours.dtype == torch.float16
    ref = _reference(folder, "tiny-F16.gguf")
    torch.testing.assert_close(_logits(ours).float(), _logits(ref), atol=2e-2, rtol=2e-2)


def test_config_from_metadata_matches_the_reference(llama):
    import transformers

    folder, original = llama
    ours = loom.AutoConfig.from_pretrained(folder, gguf_file="tiny-F32.gguf")
    ref = transformers.AutoConfig.from_pretrained(folder, gguf_file="tiny-F32.gguf")
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size",
                "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]
    # the file path itself works as gguf_file too
    assert loom.AutoConfig.from_pretrained(".", gguf_file=str(folder / "tiny-F32.gguf")).hidden_size == 32


def test_mistral_named_file_loads_as_mistral(llama):
    """The reference's rule (architecture llama, general.name "mistral"); its own load of such a file fails with
    gguf 0.19 (no "mistral" in gguf-py's architecture names), so the oracle is the model that was written."""
    folder, original = llama
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="mistral.gguf")
    assert ours.config.model_type == "mistral"
    torch.testing.assert_close(_logits(ours), _logits(original), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,ref_class,extra", [
    ("qwen2", "Qwen2ForCausalLM", {}),
    # the reference reads no head size for qwen3 and takes its default, 128; loom reads attention.key_length
    ("qwen3", "Qwen3ForCausalLM", {"head_dim": 128}),
])
@pytest.mark.parametrize("kind", ["F32", "Q4_0"])
def test_qwen_logits_equal_the_reference(tmp_path_factory, model_type, ref_class, extra, kind):
    folder, original = reference_checkpoint(tmp_path_factory, model_type, ref_class, **BLOCKS, **extra)
    write_gguf(folder / "q.gguf", original, model_type, kind)
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="q.gguf")
    tol = 1e-4 if kind == "Q4_0" else 1e-5
    torch.testing.assert_close(_logits(ours), _logits(_reference(folder, "q.gguf")), atol=tol, rtol=tol)


def test_tied_head_when_the_file_has_no_output_tensor(tmp_path_factory):
    folder, original = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM",
                                            **{**BLOCKS, "tie_word_embeddings": True})
    write_gguf(folder / "tied.gguf", original, "llama")
    ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tied.gguf")
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    torch.testing.assert_close(_logits(ours), _logits(original), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,module", [("Q4_0", "Int4Linear"), ("Q8_0", "Int8GroupLinear")])
def test_quantized_embeddings_are_expanded_and_a_tied_head_shares_them(tmp_path_factory, caplog, kind, module):
    """As in llama.cpp's own Q4_0/Q8_0 files, the token embeddings are quantized too: loom has no quantized lookup,
    so they are expanded (and said so), and the tied head uses that float table."""
    folder, original = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM",
                                            **{**BLOCKS, "tie_word_embeddings": True})
    write_gguf(folder / "q.gguf", original, "llama", kind, skip_quant=("norm",))
    with caplog.at_level(logging.WARNING, logger="loom"):
        ours = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="q.gguf")
    assert f"1 {kind} tensors are dequantized" in caplog.text  # the embedding table; the 14 Linears stay quantized
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and ours.lm_head.weight.dtype == torch.float32
    assert type(ours.model.layers[0].mlp.up_proj).__name__ == module
    torch.testing.assert_close(_logits(ours), _logits(_reference(folder, "q.gguf")), atol=1e-4, rtol=1e-4)


# -- errors -----------------------------------------------------------------------------------------------------
def _rewritten(src, dst, **changes):
    """A copy of GGUF `src` with some metadata values changed (strings) and tensors added or replaced
    ({name: array or (bytes array, raw GGML type)})."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = changes.pop("arch", reader.fields["general.architecture"].contents())
    extra = changes.pop("tensors", {})
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = changes.pop(key, field.contents())
        w.add_key_value(key, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for key, value in changes.items():
        w.add_string(key, value)
    for t in reader.tensors:
        if t.name not in extra:
            w.add_tensor(t.name, t.data.copy(), raw_dtype=t.tensor_type)
    for name, array in extra.items():
        array, raw_dtype = array if isinstance(array, tuple) else (array, None)
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    return save(w, dst)


def test_unsupported_architecture_is_named(llama):
    folder, _ = llama
    _rewritten(folder / "tiny-F32.gguf", folder / "phi2.gguf", arch="phi2")
    for load in (loom.AutoConfig.from_pretrained, loom.AutoModelForCausalLM.from_pretrained,
                 loom.LlamaForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"phi2\.gguf.*general\.architecture='phi2'.*loads llama, qwen2, qwen3"):
            load(folder, gguf_file="phi2.gguf")


def test_rotary_scaling_the_loader_cannot_apply_is_refused(llama):
    import numpy as np

    folder, _ = llama
    _rewritten(folder / "tiny-F32.gguf", folder / "rope.gguf", tensors={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"rope\.gguf.*rotary scaling.*rope_freqs"):
        loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="rope.gguf")


def test_a_type_nothing_can_expand_is_named(llama):
    import gguf
    import numpy as np

    folder, _ = llama
    q8_1 = np.zeros((64, 40), np.uint8)  # (out, in/32 blocks x 40 bytes): a 64 x 32 weight in Q8_1
    _rewritten(folder / "tiny-F32.gguf", folder / "q8_1.gguf",
               tensors={"blk.0.ffn_up.weight": (q8_1, gguf.GGMLQuantizationType.Q8_1)})
    with pytest.raises(ValueError, match=r"q8_1\.gguf: tensor blk\.0\.ffn_up\.weight is stored as Q8_1.*re-quantize"):
        loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="q8_1.gguf")


def test_missing_file_and_not_a_gguf_are_named(llama):
    folder, _ = llama
    with pytest.raises(OSError, match="no file absent.gguf"):
        loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="absent.gguf")
    (folder / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(OSError, match=r"junk\.gguf is not a readable GGUF"):
        loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="junk.gguf")


def test_quantization_config_with_a_gguf_is_refused(llama):
    folder, _ = llama
    with pytest.raises(ValueError, match="already quantized by llama.cpp.*Drop quantization_config"):
        loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q4_0.gguf",
                                                  quantization_config=loom.WeightOnlyConfig(bits=8))


def test_missing_gguf_package_is_named(llama, monkeypatch):
    folder, _ = llama
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"`gguf` package.*pip install 'gguf>=0\.10'"):
        loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-F32.gguf")
