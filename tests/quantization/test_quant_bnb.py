"""bitsandbytes 8-bit and 4-bit: identical outputs to the reference on the same checkpoint, checkpoints that move
both ways between loom and the reference, module targeting, and clear errors for a missing or unusable package."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import loom
from loom.kernels import is_plain_linear
from loomtest import reference_checkpoint
from loom.quantization import BitsAndBytesConfig, quantize_

pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional dependency (pip install bitsandbytes)")

CONFIGS = {
    "8bit": dict(load_in_8bit=True),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
}
FAMILIES = [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")]
# Every quantized Linear gets in_features a multiple of bitsandbytes' 4-bit blocksize (64) and out_features a
# multiple of 32, as in real models: on CPUs with AVX-512 (bf16) bitsandbytes repacks 4-bit weights per block for
# its CPU kernel, which needs those shapes. The suite's usual tiny width (32) only works on AVX2 machines.
BNB_SHAPES = {"llama": dict(hidden_size=64, intermediate_size=128), "gpt2": dict(n_embd=64)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {cls: reference_checkpoint(tmp_path_factory, mt, cls, **BNB_SHAPES[mt])[0] for mt, cls in FAMILIES}


def _ids():
    return torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("family", [cls for _, cls in FAMILIES])
@pytest.mark.parametrize("which", list(CONFIGS))
def test_same_outputs_as_reference_and_checkpoints_move_both_ways(checkpoints, tmp_path, family, which):
    import transformers

    path = checkpoints[family]
    ours = getattr(loom, family).from_pretrained(path, quantization_config=BitsAndBytesConfig(**CONFIGS[which]))
    ref = getattr(transformers, family).from_pretrained(
        path, quantization_config=transformers.BitsAndBytesConfig(**CONFIGS[which]))
    ids = _ids()
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    quantized = [k for k, t in ref_sd.items() if not t.is_floating_point() or k.endswith(("SCB", "absmax", "_map"))]
    assert quantized and all(torch.equal(ours_sd[k], ref_sd[k]) for k in quantized)
    # Saved before any forward: on CPUs with AVX-512 bf16, bitsandbytes repacks 4-bit weights in place on the first
    # inference forward (absmax rounded to bf16), and a later save writes that changed state, in both libraries.
    ours.save_pretrained(tmp_path / "loom")
    ref.save_pretrained(tmp_path / "ref")
    with torch.no_grad():
        out = ours(ids).logits
        # the same quantized weights; the float parts differ only by op order (GPT-2's fused Conv1D vs Linear)
        torch.testing.assert_close(out, ref(ids).logits, atol=1e-6, rtol=1e-5)
        base = getattr(loom, family).from_pretrained(path)(ids).logits
    assert ((out - base).norm() / base.norm()) < (0.02 if which == "8bit" else 0.2)
    # after inference too, loom writes exactly what the reference writes
    ours.save_pretrained(tmp_path / "loom-after")
    ref.save_pretrained(tmp_path / "ref-after")
    assert _tensors(tmp_path / "loom-after") == _tensors(tmp_path / "ref-after")

    back = getattr(transformers, family).from_pretrained(tmp_path / "loom")  # loom -> reference
    mine = getattr(loom, family).from_pretrained(tmp_path / "ref")  # reference -> loom
    assert is_plain_linear(mine.lm_head)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mine(ids).logits, out, atol=0, rtol=0)
    import json

    assert json.loads((tmp_path / "loom" / "config.json").read_text())["quantization_config"] == \
        json.loads((tmp_path / "ref" / "config.json").read_text())["quantization_config"]


def _tensors(directory) -> dict[str, tuple]:
    from safetensors.torch import load_file

    return {k: (t.dtype, tuple(t.shape), t.float().flatten().tolist())
            for k, t in load_file(directory / "model.safetensors").items()}


def test_skip_modules_replace_the_defaults_as_in_the_reference(checkpoints):
    import bitsandbytes as bnb

    path = checkpoints["LlamaForCausalLM"]
    model = loom.LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_skip_modules=["o_proj"]))
    assert is_plain_linear(model.model.layers[0].self_attn.o_proj)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert isinstance(model.lm_head, bnb.nn.Linear8bitLt)
    assert model.is_loaded_in_8bit and not model.is_loaded_in_4bit


def test_quantize_loaded_model_with_bnb(checkpoints):
    path = checkpoints["LlamaForCausalLM"]
    loaded = loom.LlamaForCausalLM.from_pretrained(path)
    on_load = loom.LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    quantize_(loaded, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert not any(m.training for m in loaded.modules())  # the swapped-in layers keep the model's eval mode
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, on_load(_ids()).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(loaded, BitsAndBytesConfig(load_in_8bit=True))


def test_missing_bitsandbytes_is_named(checkpoints, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match="BitsAndBytesConfig quantization needs the optional package 'bitsandbytes'"):
        loom.LlamaForCausalLM.from_pretrained(checkpoints["LlamaForCausalLM"],
                                              quantization_config=BitsAndBytesConfig(load_in_8bit=True))


def test_old_version_and_unsupported_device_are_named(monkeypatch):
    from loom.quantization import bnb as bnb_backend

    quantizer = bnb_backend.BnbQuantizer(BitsAndBytesConfig(load_in_8bit=True), pre_quantized=False)
    monkeypatch.setattr(bnb_backend.metadata, "version", lambda name: "0.41.1")
    with pytest.raises(ImportError, match=r"needs bitsandbytes>=0.43.0 .* found 0.41.1"):
        quantizer.validate_environment()
    import bitsandbytes

    monkeypatch.setattr(bnb_backend.metadata, "version", lambda name: "0.50.0")
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)
    with pytest.raises(RuntimeError, match="no backend for device 'cpu' .* supports cuda"):
        quantizer.validate_environment(torch.device("cpu"))
