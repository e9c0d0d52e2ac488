"""loom::rms_norm rounds like the reference, bit for bit, in its vector body and its scalar tail: where the sum of
squares is exact (small integers, a power-of-two width), the fp32 normalisation, its rounding to bf16 and the bf16
product with the weight are each one correctly rounded operation, so torch computes the same bits."""
from __future__ import annotations

import pytest
import torch
from loomtest import kernels_on


def _inv_rms(x, n):
    """1 / sqrt(sum(x^2) / n) in fp32 with each step correctly rounded (computed in float64 and rounded once, which
    for a division and a square root of fp32 values gives the correctly rounded fp32 result; torch's own fp32 sqrt
    and reciprocal differed from it in the last bit)."""
    mean = (x.double().pow(2).sum(-1, keepdim=True) / n).float()
    return (1.0 / mean.double().sqrt().float().double()).float()


@pytest.mark.parametrize("n", [64, 8, 16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_bits_match_torch_where_the_sum_is_exact(n, rows, dtype):
    if not kernels_on():
        pytest.skip("the torch path uses rsqrt, which need not be correctly rounded")
    g = torch.Generator().manual_seed(n + rows)
    x = torch.randint(-3, 4, (rows, n), generator=g).float()
    x[:, 0] = 1.0  # no all-zero row
    w = (torch.rand(n, generator=g) * 3).to(dtype)
    want = w * (x * _inv_rms(x, n)).to(dtype)
    got = torch.ops.loom.rms_norm(x.to(dtype), w, 0.0)
    assert torch.equal(got, want)
    # a tail past the 8-wide body: the same values, one column more (not a power of two: compare the first n)
    x1 = torch.cat([x, torch.zeros(rows, 1)], 1).to(dtype)
    w1 = torch.cat([w, torch.ones(1, dtype=dtype)])
    assert torch.equal(torch.ops.loom.rms_norm(x1, w1, 0.0)[:, :n], w * (x * _inv_rms(x, n + 1)).to(dtype))
