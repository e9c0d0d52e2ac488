"""Quantize-on-load reads each weight into fresh memory and drops it once quantized: no mapping of the checkpoint
file outlives the load (a live private mapping would keep every fp32 page it touched resident)."""
from __future__ import annotations

import torch

import loom
from loomtest import reference_checkpoint


def _mapped(path) -> bool:
    return any(str(path) in line for line in open("/proc/self/maps"))


def test_quantized_load_keeps_no_file_mapping(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")
    weights = path / "model.safetensors"
    fp32 = loom.LlamaForCausalLM.from_pretrained(path)
    assert _mapped(weights)  # the plain load is zero-copy: this is what the check below can detect
    del fp32
    q = loom.LlamaForCausalLM.from_pretrained(path, quantization_config=loom.WeightOnlyConfig(bits=8))
    assert not _mapped(weights)
    assert q(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 99)
