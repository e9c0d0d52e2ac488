"""loom::int4_linear at every row count: the decode kernel (up to 16 rows) and the blocked GEMM (17 rows and more,
csrc/int4.c) against the torch dequantize reference and a float64 matmul, within the bound of the kernels' only
approximation (each activation row rounded to int16, comment in csrc/int4.c). Asymmetric float16 and symmetric
float32 scales, group sizes 16 (fp32 path) to K, odd N (partial tiles), K not a multiple of the vector blocks, rows
holding inf/NaN inside a large batch, empty batches, the int32 worst case, gradients to the input, the routing of
Int4Linear and its state dict. CI runs this file at every kernel level and with the kernels off."""
from __future__ import annotations

import io

import pytest
import torch
from loomtest import kernels_on
from safetensors.torch import load, save
from torch import nn

from loom.kernels import ops, policy
from loom.quantization.linear import Int4Linear, dequantized_weight

needs_native = pytest.mark.skipif(not kernels_on(), reason="needs loom's C kernels (Linux x86-64, AVX2, a compiler)")
ROWS = [*range(1, 17), 17, 33, 100, 513]


def _args(rows, k, n, group, asymmetric, seed=0):
    g = torch.Generator().manual_seed(seed + k * 7 + n + group)
    x = torch.randn(rows, k, generator=g) * 3
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    dtype = torch.float16 if asymmetric else torch.float32
    scale = (torch.rand(n, k // group, generator=g) / 50 + 1e-3).to(dtype)
    zero = (torch.rand(n, k // group, generator=g) * 15).to(dtype) if asymmetric else None
    return x, packed, scale, zero


def _assert_within_bound(got, x, w):
    """|got - x @ w.T| <= the int16 rounding bound (max|x_row| / 65534 * sum|w_n|, exact math beyond that) plus
    fp32 rounding of the sums (a few ulps of sum |x||w|)."""
    exact = x.double() @ w.double().T
    bound = (x.abs().amax(1, keepdim=True).double() / 65534 * w.double().abs().sum(1)
             + 1e-6 * (x.abs().double() @ w.abs().double().T))
    assert got.shape == exact.shape and got.dtype == torch.float32
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, {(err / bound).max().item():.2f}x the bound"


@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("k,group", [(256, 16), (256, 32), (256, 64), (256, 128), (256, 256), (96, 32), (160, 32)])
@pytest.mark.parametrize("rows", ROWS)
def test_int4_linear_matches_reference_at_every_row_count(rows, k, group, asymmetric):
    n = 37  # a partial tile for both kernels (4-row and 16/32-column tiles)
    x, packed, scale, zero = _args(rows, k, n, group, asymmetric, seed=rows)
    got = torch.ops.loom.int4_linear(x, packed, scale, zero, group)
    _assert_within_bound(got, x, ops.int4_dequantize_reference(packed, scale, zero))


@pytest.mark.parametrize("rows", [0, 1, 40])
def test_int4_linear_keeps_leading_dims_and_empty_batches(rows):
    x, packed, scale, zero = _args(rows * 2, 64, 9, 32, True)
    x = x.view(2, rows, 64)
    got = torch.ops.loom.int4_linear(x, packed, scale, zero, 32)
    assert got.shape == (2, rows, 9)
    if rows:
        _assert_within_bound(got.view(-1, 9), x.view(-1, 64), ops.int4_dequantize_reference(packed, scale, zero))


@needs_native
@pytest.mark.parametrize("group", [16, 32, 128])  # fp32 path for all rows; int16 rows with the blocked GEMM
def test_inf_and_nan_rows_inside_a_large_batch_stay_float(group):
    # rows holding inf/NaN have no int16 scale: computed weight by weight as a float matmul would, while the other
    # rows of the batch keep the int16 bound
    x, packed, scale, zero = _args(40, 256, 37, group, True)
    x[5, 3], x[17, 0], x[39, 255] = float("inf"), float("nan"), float("-inf")
    got = torch.ops.loom.int4_linear(x, packed, scale, zero, group)
    w = ops.int4_dequantize_reference(packed, scale, zero)
    exact = x @ w.T
    bad = [5, 17, 39]
    assert torch.equal(got[bad].isnan(), exact[bad].isnan()) and torch.equal(got[bad].isinf(), exact[bad].isinf())
    finite = exact[bad].isfinite()
    torch.testing.assert_close(got[bad][finite], exact[bad][finite], rtol=1e-5, atol=1e-5)
    good = [i for i in range(40) if i not in bad]
    _assert_within_bound(got[good], x[good], w)


@needs_native
@pytest.mark.parametrize("group", [32, 128])
def test_large_batch_gives_the_same_bits_on_one_and_two_threads(group):
    # the blocked GEMM splits the weight tiles between threads: the split must not change a value, NaN/inf rows
    # (computed row by row after the GEMM) included
    x, packed, scale, zero = _args(203, 256, 37, group, True)
    x[7, 1], x[150, 0] = float("nan"), float("inf")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.loom.int4_linear(x, packed, scale, zero, group)
        torch.set_num_threads(2)
        two = torch.ops.loom.int4_linear(x, packed, scale, zero, group)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.isnan(), two.isnan())
    assert torch.equal(torch.nan_to_num(one), torch.nan_to_num(two))


@needs_native
# decode kernel, blocked GEMM at its largest group, and a larger group: the decode kernel for any row count
@pytest.mark.parametrize("rows,group", [(2, policy.INT4_GEMM_MAX_GROUP), (20, policy.INT4_GEMM_MAX_GROUP), (20, 8192)])
def test_long_groups_do_not_overflow(rows, group):
    # every nibble 15 against x rounding to 32767: one int32 lane of the blocked GEMM sums a whole group of 4096
    # columns, 2048 pairs * 2 * 15 * 32767 = 2,013,204,480, just below 2^31
    k = 8192
    packed = torch.full((35, k // 2), 0xFF, dtype=torch.uint8)
    packed[1] = 0x0F
    scale = (torch.rand(35, 1) * 1e-3 + 1e-4).expand(35, k // group).contiguous()
    x = torch.full((rows, k), 2.5)
    x[1::2, 1::2] = -7.0
    got = torch.ops.loom.int4_linear(x, packed, scale, None, group)
    _assert_within_bound(got, x, ops.int4_dequantize_reference(packed, scale, None))


@pytest.mark.parametrize("rows", [3, 40])
def test_gradient_to_the_input(rows):
    x, packed, scale, zero = _args(rows, 128, 24, 32, True)
    x.requires_grad_(True)
    g = torch.randn(rows, 24)
    (torch.ops.loom.int4_linear(x, packed, scale, zero, 32) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ ops.int4_dequantize_reference(packed, scale, zero), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("group,rows,kernel", [(32, 16, True), (32, 17, True), (128, 300, True), (16, 17, False),
                                               (8192, 17, False)])
def test_int4_linear_routes_prefill_to_the_kernel_where_it_applies(monkeypatch, group, rows, kernel):
    k = max(group, 64)
    q = Int4Linear.from_linear(nn.Linear(k, 8), group)
    calls = []
    real = ops.int4_linear
    monkeypatch.setattr(ops, "int4_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(rows, k)
    with torch.no_grad():
        got = q(x)
    assert bool(calls) == kernel and policy.int4_applies(x, group) == kernel
    _assert_within_bound(got - q.bias, x, dequantized_weight(q))


@pytest.mark.parametrize("symmetric", [False, True])
def test_state_dict_bytes_unchanged_by_running_and_round_trip(symmetric):
    torch.manual_seed(0)
    q = Int4Linear.from_linear(nn.Linear(128, 40), 32, symmetric=symmetric)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        for rows in (1, 8, 40):
            q(torch.randn(rows, 128))
    blob = save(q.state_dict())
    assert blob == save(before)
    fresh = Int4Linear(128, 40, group_size=32, symmetric=symmetric)
    fresh.load_state_dict(load(blob))
    fresh.choose_kernel()  # as loading does once the buffers are in place
    assert save(fresh.state_dict()) == blob
    x = torch.randn(40, 128)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    buf = io.BytesIO()
    torch.save(fresh.state_dict(), buf)
    assert set(torch.load(io.BytesIO(buf.getvalue()))) == set(before)


def test_python_group_limit_matches_the_c_kernel():
    from loom.kernels.build import CSRC

    source = (CSRC / "int4.c").read_text()
    assert f"#define INT4_GEMM_MAX_G {policy.INT4_GEMM_MAX_GROUP}\n" in source


# -- the int16 kernel on tiles (csrc/int4a8.c: decode sizes of Int4Linears that keep tiles) -------------------------
needs_tiles = pytest.mark.skipif(not (kernels_on() and ops.int4_tiles_int16()),
                                 reason="needs loom's kernels (the tiled int16 kernel)")


@needs_tiles
@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("k,group", [(256, 32), (256, 64), (256, 256), (96, 32), (160, 32), (4096, 4096)])
@pytest.mark.parametrize("rows", [*range(1, 17), 17, 40])
def test_tiles_give_the_int16_bound_at_every_row_count(rows, k, group, asymmetric):
    # 17 and more rows are beyond decode sizes: the operator takes the saved layout's blocked GEMM
    n = 37  # two full 16-row tiles and a partial one
    x, packed, scale, zero = _args(rows, k, n, group, asymmetric, seed=rows)
    tiles = ops.int4_a8_tiles(packed, scale, zero, group)
    got = torch.ops.loom.int4_linear(x, packed, scale, zero, group, tiles)
    _assert_within_bound(got, x, ops.int4_dequantize_reference(packed, scale, zero))
    if rows <= policy.MAX_ROWS:  # another summation order than the saved layout's kernel, the same bound
        assert not torch.equal(got, torch.ops.loom.int4_linear(x, packed, scale, zero, group))


@needs_tiles
def test_tiles_worst_case_and_inf_nan_rows():
    # every nibble 15 against x rounding to +-32767: a block's int32 sum is 32 * 15 * 32767, exact in float32 too
    k, group = 1024, 128
    packed = torch.full((20, k // 2), 0xFF, dtype=torch.uint8)
    packed[3] = 0x0F
    scale = torch.rand(20, k // group) * 1e-3 + 1e-4
    x = torch.full((4, k), 2.5)
    x[1::2, 1::2] = -7.0
    x[2, 5] = float("nan")
    x[3, 0] = float("-inf")
    tiles = ops.int4_a8_tiles(packed, scale, None, group)
    got = torch.ops.loom.int4_linear(x, packed, scale, None, group, tiles)
    w = ops.int4_dequantize_reference(packed, scale, None)
    _assert_within_bound(got[:2], x[:2], w)
    exact = x[2:] @ w.T  # rows holding inf/NaN: the saved layout's exact path, inf and NaN where a float matmul has them
    assert torch.equal(got[2:].isnan(), exact.isnan()) and torch.equal(got[2:].isinf(), exact.isinf())


@needs_tiles
@pytest.mark.parametrize("asymmetric", [True, False])
def test_tiles_one_row_gives_its_bits_in_a_batch(asymmetric):
    # a decode row alone and in batches of 2-5 (at x86-64-v3 the one-row and two-row tile loops, at AVX-512 the
    # tile loop's 1-4 row passes): the same exact integer sums and float steps, so the same bits; with worst-case
    # rows (every nibble 15 or 0 against x rounding to +-32767: the largest int32 sums the loops keep)
    k, group, n = 1024, 64, 37
    x, packed, scale, zero = _args(5, k, n, group, asymmetric, seed=7)
    packed[0], packed[1], packed[2], packed[5] = 0xFF, 0x0F, 0xF0, 0x00
    x[1] = 2.5
    x[2, 0::2], x[2, 1::2] = 3.0, -3.0
    x[3] = -1.0
    tiles = ops.int4_a8_tiles(packed, scale, zero, group)
    for rows in (2, 3, 5):
        batch = torch.ops.loom.int4_linear(x[:rows], packed, scale, zero, group, tiles)
        for m in range(rows):
            alone = torch.ops.loom.int4_linear(x[m:m + 1], packed, scale, zero, group, tiles)
            assert torch.equal(alone[0], batch[m]), (rows, m)
    _assert_within_bound(batch, x, ops.int4_dequantize_reference(packed, scale, zero))


@needs_tiles
def test_tiles_same_bits_on_one_and_two_threads_and_bf16_input():
    x, packed, scale, zero = _args(6, 512, 70, 32, True)
    tiles = ops.int4_a8_tiles(packed, scale, zero, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.loom.int4_linear(x, packed, scale, zero, 32, tiles)
        torch.set_num_threads(2)
        two = torch.ops.loom.int4_linear(x, packed, scale, zero, 32, tiles)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    xb = x.bfloat16()
    got = torch.ops.loom.int4_linear(xb, packed, scale, zero, 32, tiles)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.ops.loom.int4_linear(xb.float(), packed, scale, zero, 32, tiles).bfloat16())


@needs_tiles
def test_tiles_gradient_to_the_input():
    x, packed, scale, zero = _args(3, 128, 24, 32, True)
    x.requires_grad_(True)
    g = torch.randn(3, 24)
    tiles = ops.int4_a8_tiles(packed, scale, zero, 32)
    (torch.ops.loom.int4_linear(x, packed, scale, zero, 32, tiles) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ ops.int4_dequantize_reference(packed, scale, zero), rtol=1e-5, atol=1e-5)


def test_tiles_of_the_wrong_size_or_group_are_named():
    x, packed, scale, zero = _args(2, 128, 24, 32, True)
    with pytest.raises(ValueError, match=r"loom::int4_linear: tiles must be the uint8 \(2560,\) layout "
                                         r"int4_a8_tiles makes of these weights, got torch.uint8 \(7,\)"):
        torch.ops.loom.int4_linear(x, packed, scale, zero, 32, torch.zeros(7, dtype=torch.uint8))
    x, packed, scale, zero = _args(2, 128, 24, 16, True)
    with pytest.raises(ValueError, match=r"loom::int4_linear: tiles need group_size=16 to be a multiple of 32"):
        torch.ops.loom.int4_linear(x, packed, scale, zero, 16, torch.zeros(7, dtype=torch.uint8))


@needs_native
def test_tiles_only_where_the_kernel_level_has_them():
    q = Int4Linear.from_linear(nn.Linear(64, 16), 32)
    with torch.no_grad():
        q(torch.randn(2, 64))
    assert q.wants_tiles() == ops.int4_tiles_int16()
    assert (q._a8 is not None) == ops.int4_tiles_int16()  # no second copy where the kernel would not read it
    g16 = Int4Linear.from_linear(nn.Linear(64, 16), 16)
    with torch.no_grad():
        g16(torch.randn(2, 64))
    assert not g16.wants_tiles() and g16._a8 is None
