"""loom::int8_linear's C kernel at decode sizes (up to 64 rows) and in its blocked prefill GEMM (more rows): bit for bit
the arithmetic csrc/int8.c states (int16 activations, exact integer sums, one rounding), within the int16 rounding
bound of the dequantized float matmul, the same bits for a row whatever else is in the batch, inf/NaN rows as a float
matmul, empty shapes, no int32 overflow at long K, and gradients. CI runs this file at every LOOM_KERNELS level and
with the kernels off (then the operator is the float matmul, and only the tolerance tests apply)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loomtest import kernels_on

from loom.kernels import ops

native = pytest.mark.skipif(not kernels_on(), reason="needs loom's C kernels (Linux x86-64 with AVX2 and gcc)")
int8_linear = torch.ops.loom.int8_linear

# rows: every decode block size and more decode passes (up to 64 rows), then the GEMM: one 12-row micro-kernel
# block + a tail (65), several blocks
ROWS = [*range(1, 17), 17, 33, 64, 65, 100, 513]
# K: a tail after whole vectors (776 = 24*32 + 8), odd K (pairs padded), tiny; N: a partial weight tile / panel
DIMS = [(776, 37), (1001, 5), (16, 70), (3, 1)]


def _args(rows, k, n, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + rows * 31 + k + n)
    x = torch.randn(rows, k, generator=g) * 3
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return x, w, torch.rand(n, generator=g) / 100


def kernel_formula(x, w, scale):
    """What the kernel computes, in torch: q = round(x * (32767 / max|x|)) per row in fp32, the integer sum of w * q
    in int64 (exact), then (float)sum * (max|x| / 32767) * scale in fp32."""
    amax = x.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros(()))
    q = torch.round(x * inv).long()
    return (q @ w.long().T).float() * (amax / 32767.0) * scale


def _within_int16_bound(got, x, w, scale):
    exact = F.linear(x.double(), ops.int8_dequantize(w, scale, torch.float64))
    # each x rounds by at most max|x| / 65534 (half an int16 step), each output moves by that times sum |w|, plus
    # a few fp32 roundings of the largest output
    wsum = (w.double().abs() * scale.double()[:, None]).sum(1)
    bound = x.abs().amax(1, keepdim=True).double() / 65534 * wsum + 1e-6 * exact.abs().amax().clamp(min=1)
    assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() - bound).max()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n", DIMS)
def test_matches_the_dequantized_matmul_within_the_int16_bound(rows, k, n):
    x, w, s = _args(rows, k, n)
    got = int8_linear(x, w, s)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    _within_int16_bound(got, x, w, s)


@native
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n", DIMS)
def test_is_bit_exact_to_its_stated_arithmetic(rows, k, n):
    x, w, s = _args(rows, k, n)
    assert torch.equal(int8_linear(x, w, s), kernel_formula(x, w, s))


@native
@pytest.mark.parametrize("rows", [5, 40, 70])
def test_a_row_gets_the_same_bits_alone_or_in_any_batch(rows):
    # decode blocks (1-4 rows), the GEMM's 12-row micro-kernel and its tails all sum exactly
    x, w, s = _args(rows, 1000, 1003, seed=1)
    batch = int8_linear(x, w, s)
    for m in (0, rows // 2, rows - 1):
        assert torch.equal(batch[m], int8_linear(x[m:m + 1], w, s)[0])


@native
@pytest.mark.parametrize("rows", [4, 70])  # decode and GEMM
def test_rows_with_inf_or_nan_take_the_float_path(rows):
    x, w, s = _args(rows, 776, 37, seed=2)
    x[1, 3], x[2, 0], x[rows - 1, 775] = float("inf"), float("nan"), float("-inf")
    got = int8_linear(x, w, s)
    exact = x @ ops.int8_dequantize(w, s).T
    bad = torch.tensor([1, 2, rows - 1])
    assert torch.equal(got[bad].isnan(), exact[bad].isnan()) and torch.equal(got[bad].isinf(), exact[bad].isinf())
    finite = exact[bad].isfinite()
    torch.testing.assert_close(got[bad][finite], exact[bad][finite], rtol=1e-5, atol=1e-5)
    good = torch.tensor([m for m in range(rows) if m not in bad.tolist()])
    assert torch.equal(got[good], kernel_formula(x[good], w, s))  # neighbours of such rows are unaffected


@pytest.mark.parametrize("shape", [(0, 8, 5), (3, 8, 0), (70, 8, 0), (3, 0, 5), (70, 0, 5)])
def test_empty_shapes(shape):
    m, k, n = shape
    got = int8_linear(torch.randn(m, k), torch.zeros(n, k, dtype=torch.int8), torch.ones(n))
    assert got.shape == (m, n) and not got.any()


@native
@pytest.mark.parametrize("rows", [1, 2, 66])
def test_long_k_does_not_overflow(rows):
    # every product at its largest (|w| 128, x at max|x| rounds to +-32767): one int32 lane passes 2^31 after 256
    # vector steps without the flush; 16384 + 21 columns cross the flush point 1-4 times (one row: the AVX-512
    # one-row loop's 64-column steps) and end in a tail
    k = 16384 + 21
    w = torch.stack([torch.full((k,), -128), torch.full((k,), 127), torch.full((k,), 127)]).to(torch.int8)
    w[2, 1::2] = -128
    s = torch.tensor([1e-3, 2e-3, 1e-3])
    x = torch.full((rows, k), 2.5)
    x[1::2] = -7.0
    got = int8_linear(x, w, s)
    assert torch.equal(got, kernel_formula(x, w, s))
    exact = x.double() @ (w.double() * s.double()[:, None]).T
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [3, 20, 70])
def test_gradients_equal_the_dequantized_path(rows):
    x, w, s = _args(rows, 40, 6, seed=3)
    x.requires_grad_(True)
    s.requires_grad_(True)
    g = torch.randn(rows, 6)
    (int8_linear(x, w, s) * g).sum().backward()
    x2, s2 = x.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    (F.linear(x2, w.float() * s2[:, None]) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [2, 20])
def test_bf16_and_batched_inputs(rows):
    x, w, s = _args(rows * 3, 64, 9, seed=4)
    xb = x.bfloat16()
    got = int8_linear(xb.view(3, rows, 64), w, s)
    assert got.dtype == torch.bfloat16 and got.shape == (3, rows, 9)
    exact = xb.double() @ ops.int8_dequantize(w, s, torch.float64).T
    torch.testing.assert_close(got.view(-1, 9).double(), exact, rtol=2 ** -7, atol=1e-2 * exact.abs().max().item())
    if kernels_on():  # fp32 arithmetic on the bf16 values, one rounding to bf16 at the end
        assert torch.equal(got.view(-1, 9), int8_linear(xb.float(), w, s).bfloat16())
