"""BERT's CPU training paths (cheaper dropout mask, attention written out): the semantics of dropout and SDPA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loom.models.bert import Dropout, _cpu_attention_with_dropout, dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_zeroes_a_fraction_p_and_scales_the_rest(dtype):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, dtype=dtype, requires_grad=True)
    out = dropout(x, 0.1, True)
    kept = out != 0
    # 1e6 Bernoulli(0.9) draws: the kept fraction is within 5 standard deviations (0.0015) of 0.9
    assert abs(kept.float().mean().item() - 0.9) < 0.0015
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.9))
    out.backward(torch.full_like(out, 2.0))
    torch.testing.assert_close(x.grad, 2.0 * out.detach())  # the gradient goes through the same mask
    assert out.dtype == dtype


def test_dropout_is_identity_when_not_training_and_follows_the_seed():
    x = torch.randn(64, 64)
    assert dropout(x, 0.5, False) is x and dropout(x, 0.0, True) is x
    torch.manual_seed(3)
    a = Dropout(0.3)(x)
    torch.manual_seed(3)
    b = Dropout(0.3)(x)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    assert torch.equal(Dropout(0.3).eval()(x), x)


def test_attention_with_dropout_is_sdpa_with_the_same_mask():
    """Same dropout mask (regenerated from the seed) applied to SDPA's math, with padding: outputs and grads agree."""
    torch.manual_seed(0)
    B, H, T, D, p = 2, 3, 5, 4, 0.25
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    mask[1, ..., 3:] = False  # the second sequence has two padding keys

    torch.manual_seed(7)
    out = _cpu_attention_with_dropout(q, k, v, mask, p)
    torch.manual_seed(7)
    keep = torch.rand(B, H, T, T, dtype=torch.float32) >= p
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, -math.inf)
    expected = (torch.softmax(scores, -1) * keep / (1 - p)) @ v
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # and without dropping anything, it is SDPA
    no_drop = torch.matmul(torch.softmax(scores, -1), v)
    torch.testing.assert_close(no_drop, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-12,
                               atol=1e-12)
