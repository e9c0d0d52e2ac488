"""The per-step pieces of Llama-family decode, each against the reference formula: DynamicCache's growing buffers
(equal to concatenating every update, through crop / beam reorder / batch repeat), the rotary embedding (q and k
rotated together, sign folded into sin) and the fused RMSNorm."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from loom.models.cache import DynamicCache
from loom.models.common import RMSNorm
from loom.models.rope import RotaryEmbedding, apply_rotary
from loom.models.llama import LlamaConfig


def _kv(batch: int, steps: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 2, steps, 4, generator=torch.Generator().manual_seed(seed))


def test_dynamic_cache_equals_concatenation_across_growth():
    cache = DynamicCache()
    keys, values = [], []
    for i, steps in enumerate([5, 1, 1, 12, 1, 30, 1]):  # crosses the 16-slot start and two doublings
        k, v = _kv(2, steps, 2 * i), _kv(2, steps, 2 * i + 1)
        keys.append(k)
        values.append(v)
        got_k, got_v = cache.update(k, v, 0)
        assert torch.equal(got_k, torch.cat(keys, -2)) and torch.equal(got_v, torch.cat(values, -2))
    assert cache.get_seq_length() == sum(k.shape[-2] for k in keys)


def test_dynamic_cache_crop_reorder_repeat():
    cache = DynamicCache()
    k, v = _kv(3, 20, 0), _kv(3, 20, 1)
    cache.update(k, v, 0)
    cache.crop(7)
    assert cache.get_seq_length() == 7
    k2, v2 = _kv(3, 1, 2), _kv(3, 1, 3)
    got_k, got_v = cache.update(k2, v2, 0)  # overwrites slot 7 after the crop
    assert torch.equal(got_k, torch.cat([k[..., :7, :], k2], -2)) and torch.equal(got_v, torch.cat([v[..., :7, :], v2], -2))

    beam_idx = torch.tensor([2, 2, 0])
    cache.reorder_cache(beam_idx)
    legacy_k, legacy_v = cache.to_legacy_cache()[0]
    assert torch.equal(legacy_k, got_k[beam_idx]) and torch.equal(legacy_v, got_v[beam_idx])

    cache.batch_repeat_interleave(2)
    k3, v3 = _kv(6, 1, 4), _kv(6, 1, 5)
    got_k, _ = cache.update(k3, v3, 0)
    assert torch.equal(got_k, torch.cat([legacy_k.repeat_interleave(2, 0), k3], -2))


def _reference_rotary(q, k, position_ids, inv_freq, dtype):
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    rot = cos.shape[-1]
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos, sin)
    return torch.cat((q_rot, q[..., rot:]), -1), torch.cat((k_rot, k[..., rot:]), -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotary_matches_reference_bitwise(dtype, partial):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": partial})
    rotary = RotaryEmbedding(config, 16)
    assert rotary.dim == int(16 * partial)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 16, generator=g).to(dtype).transpose(1, 2)  # (B, H, T, D) strided, as in attention
    k = torch.randn(2, 5, 2, 16, generator=g).to(dtype).transpose(1, 2)
    position_ids = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    got_q, got_k = apply_rotary(q, k, *rotary(position_ids, dtype))
    want_q, want_k = _reference_rotary(q, k, position_ids, rotary.inv_freq, dtype)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, generator=g) * 0.2 + 1
    x = (torch.randn(3, 7, 96, generator=g) * 4).to(dtype)
    ours, ref = RMSNorm(96, eps=1e-5).to(dtype), LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ref.weight.copy_(weight)
        tol = dict(rtol=1e-6, atol=1e-6) if dtype is torch.float32 else {}
        torch.testing.assert_close(ours(x), ref(x), **tol)
