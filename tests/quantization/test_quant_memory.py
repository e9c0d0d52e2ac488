"""Quantize-on-load reads each weight into fresh memory and drops it once quantized: no mapping of the checkpoint
file outlives the load (a live private mapping would keep every fp32 page it touched resident)."""
from __future__ import annotations

import gc

import pytest
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


def test_disable_mmap_reads_weights_into_own_memory(tmp_path_factory):
    """The reference's `disable_mmap=True`: no mapping of the file outlives the load, the weights are the same (and
    on Linux they are then backed by huge pages where the kernel allows, see back_with_huge_pages)."""
    path, _ = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")
    weights = path / "model.safetensors"
    mapped = loom.LlamaForCausalLM.from_pretrained(path)
    own = loom.LlamaForCausalLM.from_pretrained(path, disable_mmap=True)
    for (name, a), b in zip(mapped.state_dict().items(), own.state_dict().values()):
        assert torch.equal(a, b), name
    del mapped, a, b
    gc.collect()
    assert not _mapped(weights)
    with pytest.raises(TypeError, match="disable_mmap must be True, False or None, got 'yes'"):
        loom.LlamaForCausalLM.from_pretrained(path, disable_mmap="yes")
