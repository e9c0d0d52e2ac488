"""The torch.ops.loom operators: each against its torch reference over edge shapes (0 rows, 1 row, odd and large K)
in fp32 and bf16, torch.library.opcheck (schema, fake implementation, autograd registration, AOT tracing), bad
inputs raising errors that name the operator, NaN/inf propagating as torch's ops propagate them, and the ctypes
signatures matching the C header."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from loomtest import kernels_on

from loom.kernels import ops
from loom.kernels.signatures import SIGNATURES

ops_ = torch.ops.loom


def _dense_args(rows, k, n, dtype, bias=True, grad=False):
    g = torch.Generator().manual_seed(rows * 31 + k)
    x = torch.randn(rows, k, generator=g).to(dtype).requires_grad_(grad)
    w = torch.randn(n, k, generator=g).to(dtype).requires_grad_(grad)
    b = torch.randn(n, generator=g).to(dtype).requires_grad_(grad) if bias else None
    return x, w, b


def _attn_args(B, H, Hkv, L, D, dtype, masked=False, grad=False):
    g = torch.Generator().manual_seed(B * 7 + L)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype).requires_grad_(grad)
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, L, generator=g) > 0.3
        mask[..., 0] = True
    return q, k, v, mask, D ** -0.5


def _int8_args(rows, k, n, grad=False):
    g = torch.Generator().manual_seed(k + n)
    return (torch.randn(rows, k, generator=g).requires_grad_(grad),
            torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) / 100)


def _int4_args(rows, k, n, group, asymmetric=True, grad=False):
    g = torch.Generator().manual_seed(k + n + group)
    x = torch.randn(rows, k, generator=g).requires_grad_(grad)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    dtype = torch.float16 if asymmetric else torch.float32
    scale = (torch.rand(n, k // group, generator=g) / 50).to(dtype)
    zero = (torch.rand(n, k // group, generator=g) * 15).to(dtype) if asymmetric else None
    return x, packed, scale, zero, group


ROWS = [0, 1, 3, 16]


def _peak(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0
DIMS = [(16, 8), (37, 5), (4096, 24)]  # K a whole block, odd K with a tail, large K


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n", DIMS)
def test_dense_linear_matches_torch(dtype, rows, k, n):
    x, w, b = _dense_args(rows, k, n, dtype)
    got = ops_.dense_linear(x, w, b)
    exact = F.linear(x.double(), w.double(), b.double())
    tol = dict(rtol=1e-5, atol=1e-4) if dtype is torch.float32 else dict(rtol=1e-2, atol=5e-2)
    assert got.shape == (rows, n) and got.dtype == dtype
    torch.testing.assert_close(got.double(), exact, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", [16, 37, 4096])
def test_rms_norm_matches_torch(dtype, rows, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    got = ops_.rms_norm(x, w, 1e-6)
    want = ops.rms_norm_reference(x, w, 1e-6)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype is torch.float32 else dict(rtol=2 ** -7, atol=0)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", [16, 37, 4096])
def test_gemma_rms_norm_matches_the_reference_norm(dtype, rows, n):
    """loom::gemma_rms_norm against the reference's GemmaRMSNorm math (fp32 x / rms * (1 + w), rounded once): within
    1e-6 in fp32 (the sum of squares is added in another order), and bf16 within one rounding of it."""
    g = torch.Generator().manual_seed(n + 7)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    w = (torch.randn(n, generator=g) * 0.5).to(dtype)
    got = ops_.gemma_rms_norm(x, w, 1e-6)
    want = ops.gemma_rms_norm_reference(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype is torch.float32 else dict(rtol=2 ** -7, atol=0)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype is torch.bfloat16 and rows:  # one bf16 rounding of the fp32 result: nearly all the same bits
        assert (got != want).float().mean() < 0.01


def test_gemma_rms_norm_bits_where_the_sum_is_exact():
    """Where the mean of squares is exact (small integers, width a power of two), every step is one correctly
    rounded fp32 operation, so the kernel gives torch's bits, in the 8-wide body and the scalar tail."""
    if not kernels_on():
        pytest.skip("the torch path is the reference itself")
    g = torch.Generator().manual_seed(3)
    for n in (16, 64):
        x = torch.randint(-3, 4, (3, n), generator=g).float()
        x[:, 0] = 1.0
        w = torch.randn(n, generator=g)
        inv = (1.0 / ((x.double().pow(2).sum(-1, keepdim=True) / n).float().double().sqrt().float().double())).float()
        for dtype in (torch.float32, torch.bfloat16):
            want = ((x * inv) * (1.0 + w.to(dtype).float())).to(dtype)
            assert torch.equal(ops_.gemma_rms_norm(x.to(dtype), w.to(dtype), 0.0), want)
            # 7 columns more: the same first n values come out of the body and a 7-wide scalar tail
            xt = torch.cat([x, torch.zeros(3, 7)], 1).to(dtype)
            wt = torch.cat([w, torch.zeros(7)]).to(dtype)
            inv_t = (1.0 / ((x.double().pow(2).sum(-1, keepdim=True) / (n + 7)).float().double().sqrt().float()
                            .double())).float()
            assert torch.equal(ops_.gemma_rms_norm(xt, wt, 0.0)[:, :n],
                               ((x * inv_t) * (1.0 + w.to(dtype).float())).to(dtype))


def _moe_args(T, k, E, N, K, dtype, weights_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    w = torch.randn(E, N, K, generator=g).to(dtype)
    chosen = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    weights = torch.rand(T, k, generator=g).to(weights_dtype)
    return x, w, chosen, weights


@pytest.mark.parametrize("dtype,weights_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("T,k,E,K", [(1, 2, 8, 64), (3, 2, 4, 37), (16, 4, 6, 32), (0, 2, 4, 16)])
def test_moe_ops_are_the_per_expert_products(dtype, weights_dtype, T, k, E, K):
    """loom::moe_gate_up gives each slot's product with its expert in expert-grouped order, loom::moe_down the
    weighted sum over each token's experts in expert order, each bitwise loom::dense_linear's products rounded as
    the module path's torch ops round them."""
    x, w, chosen, weights = _moe_args(T, k, E, 24, K, dtype, weights_dtype, seed=T + K)
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)
    y = ops_.moe_gate_up(x, w, chosen)
    assert y.shape == (T * k, 24) and y.dtype == dtype
    wd = torch.randn(E, 40, 24, generator=torch.Generator().manual_seed(9)).to(dtype)
    out = ops_.moe_down(y, wd, chosen, weights)
    want, parts = torch.zeros(T, 40, dtype=dtype), {}
    for e in range(E):  # each expert's product over exactly its rows, as the module path runs it
        at = (flat[order] == e).nonzero().reshape(-1)
        if len(at):
            slots = order[at]
            assert torch.equal(y[at], ops_.dense_linear(x[slots // k], w[e], None))
            parts.update(zip(slots.tolist(), ops_.dense_linear(y[at], wd[e], None)))
    for t in range(T):
        for j in sorted(range(k), key=lambda j: int(chosen[t, j])):
            want[t] = want[t] + (parts[t * k + j] * weights[t, j]).to(dtype)
    assert out.shape == (T, 40) and torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,L,D,masked", [(0, 4, 2, 3, 16, False), (1, 4, 4, 1, 16, False),
                                                (2, 6, 2, 13, 37, True), (1, 8, 2, 2000, 64, True)])
def test_decode_attention_matches_sdpa(dtype, B, H, Hkv, L, D, masked):
    q, k, v, mask, scale = _attn_args(B, H, Hkv, L, D, dtype, masked)
    got = ops_.decode_attention(q, k, v, mask, scale)
    want = ops.attention_reference(q.float(), k.float(), v.float(), mask, scale)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=2 ** -7, atol=1e-3)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.skipif(not kernels_on(), reason="needs loom's C kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,L,D,masked", [(1, 12, 4, 64, 64, False), (3, 6, 2, 40, 32, True),
                                                (2, 8, 8, 300, 16, True)])
def test_decode_attention_same_bits_on_one_and_two_threads(dtype, B, H, Hkv, L, D, masked):
    # sizes past the kernel's threshold for sharing the heads between threads (chunks of one KV head's queries)
    q, k, v, mask, scale = _attn_args(B, H, Hkv, L, D, dtype, masked)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops_.decode_attention(q, k, v, mask, scale)
        torch.set_num_threads(2)
        two = ops_.decode_attention(q, k, v, mask, scale)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    want = ops.attention_reference(q.float(), k.float(), v.float(), mask, scale)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(two.float(), want, **tol)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n", DIMS)
def test_int8_linear_matches_dequantized(rows, k, n):
    x, w, s = _int8_args(rows, k, n)
    got = ops_.int8_linear(x, w, s)
    exact = F.linear(x.double(), ops.int8_dequantize(w, s, torch.float64))
    # plus the int16 rounding of each activation row (step max|x| / 32767)
    wsum = (w.double().abs() * s.double()[:, None]).sum(1)
    bound = 1e-5 * _peak(exact) + x.abs().amax(1, keepdim=True).double() / 65534 * wsum
    assert got.shape == (rows, n) and ((got.double() - exact).abs() <= bound + 1e-6).all()
    bf = ops_.int8_linear(x.bfloat16(), w, s)
    assert bf.dtype == torch.bfloat16 and bf.shape == (rows, n)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n,group", [(32, 8, 32), (48, 5, 16), (4096, 24, 128)])
@pytest.mark.parametrize("asymmetric", [True, False])
def test_int4_linear_matches_dequantized(rows, k, n, group, asymmetric):
    x, packed, scale, zero, group = _int4_args(rows, k, n, group, asymmetric)
    w = ops.int4_dequantize_reference(packed, scale, zero)
    assert torch.equal(ops_.int4_dequantize(packed, scale, zero, group), w)
    got = ops_.int4_linear(x, packed, scale, zero, group)
    exact = F.linear(x.double(), w.double())
    bound = 1e-5 * _peak(exact) + x.abs().amax(1, keepdim=True).double() / 65534 * w.double().abs().sum(1)
    assert got.shape == (rows, n) and ((got.double() - exact).abs() <= bound + 1e-5).all()


def test_int4_quantizer_output_layout():
    w = torch.randn(12, 64)
    packed, scale, zero = ops_.int4_quantize_asymmetric(w, 32)
    assert packed.shape == (12, 32) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (12, 2) and scale.dtype == zero.dtype == torch.float16
    assert torch.equal(zero, zero.round()) and 0 <= zero.min() and zero.max() <= 15  # integer zero points
    err = (ops.int4_dequantize_reference(packed, scale, zero) - w).norm() / w.norm()
    assert err < 0.15


# -- opcheck: schema, fake (meta) implementation, autograd registration and AOT dispatch -------------------------
def _opcheck_cases():
    yield "dense_linear", _dense_args(3, 37, 5, torch.float32, grad=True)
    yield "dense_linear", _dense_args(1, 16, 8, torch.bfloat16, bias=False)
    x, w, _ = _dense_args(2, 16, 8, torch.float32, grad=True)
    yield "rms_norm", (x, torch.rand(16).requires_grad_(True), 1e-6)
    yield "rms_norm", (x.detach().bfloat16(), torch.rand(16).bfloat16(), 1e-5)
    yield "gemma_rms_norm", (x, torch.randn(16).requires_grad_(True), 1e-6)
    yield "gemma_rms_norm", (x.detach().bfloat16(), torch.randn(16).bfloat16(), 1e-5)
    yield "decode_attention", _attn_args(2, 4, 2, 9, 16, torch.float32, masked=True, grad=True)
    x, w, chosen, weights = _moe_args(3, 2, 4, 8, 16, torch.float32)
    yield "moe_gate_up", (x, w, chosen)
    yield "moe_down", (torch.randn(6, 16), w, chosen, weights)
    yield "decode_attention", _attn_args(1, 4, 4, 5, 8, torch.bfloat16)
    yield "int8_linear", _int8_args(3, 40, 6, grad=True)
    yield "int4_linear", _int4_args(2, 64, 6, 32, grad=True)
    yield "int4_linear", _int4_args(2, 64, 6, 16, asymmetric=False)
    wq = torch.randint(-128, 128, (6, 64), dtype=torch.int8)
    yield "int8_group_linear", (torch.randn(3, 64).requires_grad_(True), wq, torch.rand(6, 2) / 50, 32)
    yield "int8_group_linear", (torch.randn(2, 64), wq, (torch.rand(6, 4) / 50).half(), 16)
    _, packed, scale, zero, group = _int4_args(1, 64, 6, 32)
    yield "int4_dequantize", (packed, scale, zero, group)
    yield "int4_quantize_asymmetric", (torch.randn(6, 64), 32)


@pytest.mark.parametrize("name,args", list(_opcheck_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops_, name).default, args)


def test_meta_and_fake_tensors_get_shapes_only():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(2, 5, 64), torch.empty(24, 64)
        assert ops_.dense_linear(x, w, None).shape == (2, 5, 24)
        assert ops_.rms_norm(x, torch.empty(64), 1e-6).shape == x.shape
    meta = ops_.decode_attention(*(t.to("meta") if t is not None else None for t in _attn_args(2, 4, 2, 7, 16,
                                                                                                torch.float32)[:4]),
                                 0.25)
    assert meta.device.type == "meta" and meta.shape == (2, 4, 1, 16)


# -- bad inputs: errors that name the operator and the argument ---------------------------------------------------
BAD = [
    ("rms_norm", lambda: ops_.rms_norm(torch.randn(2, 8).half(), torch.ones(8).half(), 1e-6), "x has dtype float16"),
    ("rms_norm", lambda: ops_.rms_norm(torch.randn(2, 8), torch.ones(9), 1e-6), r"weight has shape \(9,\)"),
    ("rms_norm", lambda: ops_.rms_norm(torch.randn(2, 8), torch.ones(8).bfloat16(), 1e-6), "must match"),
    ("gemma_rms_norm", lambda: ops_.gemma_rms_norm(torch.randn(2, 8), torch.ones(9), 1e-6), r"weight has shape \(9,\)"),
    ("gemma_rms_norm", lambda: ops_.gemma_rms_norm(torch.randn(2, 8).half(), torch.ones(8).half(), 1e-6),
     "loom::gemma_rms_norm: x has dtype float16"),
    ("dense_linear", lambda: ops_.dense_linear(torch.randn(2, 8), torch.randn(4, 9), None), "8 features"),
    ("moe_gate_up", lambda: ops_.moe_gate_up(torch.randn(2, 8), torch.randn(3, 4, 8), torch.tensor([[0, 3], [1, 2]])),
     "expert index outside 0..2"),
    ("moe_gate_up", lambda: ops_.moe_gate_up(torch.randn(2, 8), torch.randn(3, 4, 8).bfloat16(),
                                             torch.tensor([[0, 1], [1, 2]])), "must match"),
    ("moe_gate_up", lambda: ops_.moe_gate_up(torch.randn(2, 8), torch.randn(3, 4, 8), torch.tensor([[0, 1]])),
     "x has 2 rows, expected 1"),
    ("moe_down", lambda: ops_.moe_down(torch.randn(4, 8), torch.randn(3, 4, 8), torch.tensor([[0, 1], [1, 2]]),
                                       torch.rand(2, 3)), r"weights has shape \(2, 3\)"),
    ("moe_down", lambda: ops_.moe_down(torch.randn(3, 8), torch.randn(3, 4, 8), torch.tensor([[0, 1], [1, 2]]),
                                       torch.rand(2, 2)), "h has 3 rows, expected 4"),
    ("moe_down", lambda: ops_.moe_down(torch.randn(4, 8), torch.randn(3, 4, 8), torch.tensor([[0, 1], [1, 5]]),
                                       torch.rand(2, 2)), "expert index outside 0..2"),
    ("dense_linear", lambda: ops_.dense_linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), "bias"),
    ("dense_linear", lambda: ops_.dense_linear(torch.randn(2, 8).to_sparse(), torch.randn(4, 8), None),
     "dense|sparse|Sparse"),
    ("int8_linear", lambda: ops_.int8_linear(torch.randn(2, 8), torch.randn(4, 8), torch.ones(4)),
     "weight must be int8"),
    ("int8_linear", lambda: ops_.int8_linear(torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8),
                                             torch.ones(3)), "scale must be float32 \\(4,\\)"),
    ("int4_linear", lambda: ops_.int4_linear(torch.randn(2, 48), torch.zeros(4, 24, dtype=torch.uint8),
                                             torch.ones(4, 1), None, 32), "group_size=32 must divide K=48"),
    ("int4_linear", lambda: ops_.int4_linear(torch.randn(2, 64), torch.zeros(4, 32, dtype=torch.uint8),
                                             torch.ones(4, 2), torch.ones(4, 2).half(), 32), "zero must match"),
    ("int4_dequantize", lambda: ops_.int4_dequantize(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 8), None,
                                                     8), "multiple of 16"),
    ("decode_attention", lambda: ops_.decode_attention(torch.randn(1, 6, 1, 8), torch.randn(1, 4, 3, 8),
                                                       torch.randn(1, 4, 3, 8), None, 1.0), "not a multiple"),
    ("decode_attention", lambda: ops_.decode_attention(torch.randn(1, 4, 1, 8), torch.randn(1, 4, 3, 8),
                                                       torch.randn(1, 4, 3, 8), torch.ones(1, 1, 1, 3), 1.0),
     "mask must be bool"),
    ("decode_attention", lambda: ops_.decode_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 3, 8),
                                                       torch.randn(1, 4, 3, 8), None, 1.0), r"q \(B, H, 1, D\)"),
]


@pytest.mark.parametrize("op,call,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_name_the_operator(op, call, message):
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)) as err:
        call()
    assert re.search(message, str(err.value)), str(err.value)
    assert f"loom::{op}" in str(err.value) or "sparse" in message.lower()


def test_bad_inputs_on_meta_are_caught_by_the_fake_implementation():
    with pytest.raises(ValueError, match="loom::rms_norm: x has dtype float16"):
        ops_.rms_norm(torch.empty(2, 8, device="meta", dtype=torch.float16), torch.empty(8, device="meta",
                                                                                         dtype=torch.float16), 1e-6)


def test_dtensor_reaching_an_operator_is_an_error_naming_it():
    """A DTensor is dispatched by DTensor itself: without a sharding rule it is an error that names the operator,
    never a raw pointer (one process, world size 1)."""
    code = textwrap.dedent("""
        import os, tempfile, torch, torch.distributed as dist
        from torch.distributed.tensor import DeviceMesh, distribute_tensor, Replicate
        import loom.kernels
        dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
        mesh = DeviceMesh("cpu", [0])
        x = distribute_tensor(torch.randn(2, 8), mesh, [Replicate()])
        try:
            torch.ops.loom.rms_norm(x, distribute_tensor(torch.ones(8), mesh, [Replicate()]), 1e-6)
        except Exception as e:
            print("ERROR", type(e).__name__, e)
        dist.destroy_process_group()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERROR" in out.stdout and "loom.rms_norm" in out.stdout, out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_tensor_is_an_error_naming_the_operator():
    with pytest.raises(NotImplementedError, match="loom::rms_norm"):
        ops_.rms_norm(torch.randn(2, 8, device="cuda"), torch.ones(8, device="cuda"), 1e-6)


def test_noncontiguous_inputs_give_the_contiguous_result():
    x = torch.randn(16, 6).t()  # (6, 16) with strides (1, 6)
    w = torch.rand(16) + 0.5
    torch.testing.assert_close(ops_.rms_norm(x, w, 1e-6), ops_.rms_norm(x.contiguous(), w, 1e-6))
    q, k, v, _, scale = _attn_args(1, 4, 2, 9, 16, torch.float32)
    k_strided = torch.randn(1, 2, 16, 9).transpose(-1, -2)  # unit stride along L, not D
    torch.testing.assert_close(ops_.decode_attention(q, k_strided, v, None, scale),
                               ops.attention_reference(q, k_strided, v, None, scale), rtol=1e-5, atol=1e-6)


# -- NaN / inf --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", [0, 3, 7, 8, 12, 13])  # inside the 8-wide blocks and in the scalar tail
@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_in_attention_propagates_at_every_position(position, where):
    q, k, v, _, scale = _attn_args(1, 2, 2, 14, 16, torch.float32)
    (k if where == "k" else v)[0, :, position, 0] = float("nan")
    got = ops_.decode_attention(q, k, v, None, scale)
    want = ops.attention_reference(q, k, v, None, scale)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_nothing_to_attend_to_gives_zeros_as_sdpa(dtype):
    """A fully masked row (a padding query, an all-zero attention_mask row) gets zeros and zero gradients, as from
    SDPA (the reference's attention), not NaN; the other rows are untouched."""
    q, k, v, mask, scale = _attn_args(3, 4, 2, 11, 16, dtype, masked=True, grad=True)
    mask[1] = False
    got = ops_.decode_attention(q, k, v, mask, scale)
    want = ops.attention_reference(q, k, v, mask, scale)
    assert not got.isnan().any() and torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got.float(), want.float(), **({} if dtype is torch.float32 else dict(rtol=2 ** -7,
                                                                                                   atol=1e-3)))
    got.float().sum().backward()
    assert not q.grad.isnan().any() and torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_inf_in_attention_and_rms_norm_as_torch():
    q, k, v, _, scale = _attn_args(1, 2, 2, 10, 16, torch.float32)
    k[0, 0, 4, :] = float("inf")
    got, want = ops_.decode_attention(q, k, v, None, scale), ops.attention_reference(q, k, v, None, scale)
    assert torch.equal(got.isnan(), want.isnan())
    x = torch.randn(3, 40)
    x[1, 5] = float("inf")
    x[2, 39] = float("nan")
    w = torch.ones(40)
    got, want = ops_.rms_norm(x, w, 1e-6), ops.rms_norm_reference(x, w, 1e-6)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got[0], want[0])


# -- the C header and the ctypes declarations -----------------------------------------------------------------------
_C_TYPES = {"const void *": "c_void_p", "void *": "c_void_p", "const uint8_t *": "c_void_p",
            "const float *": "c_void_p", "float *": "c_void_p", "const int8_t *": "c_void_p",
            "uint8_t *": "c_void_p", "uint16_t *": "c_void_p", "int64_t *": "c_void_p", "const int64_t *": "c_void_p",
            "long": "c_long", "int": "c_int", "float": "c_float",
            "const char *": "c_char_p", "void": None}


def test_header_and_ctypes_signatures_agree():
    from loom.kernels.build import CSRC

    header = (CSRC / "loom_kernels.h").read_text()
    protos = re.findall(r"^LOOM_API (.+?)\s*\b(loom_\w+)\((.*?)\);", header, flags=re.M)
    assert {name for _, name, _ in protos} == set(SIGNATURES)
    for ret, name, params in protos:
        restype, argtypes = SIGNATURES[name]
        assert _C_TYPES[ret.replace("*", " *").replace("  ", " ").strip()] == (
            None if restype is None else restype.__name__), name
        c_args = [] if params.strip() == "void" else [
            _C_TYPES[re.sub(r"\s*\w+$", "", p.strip()).replace("*", " *").replace("  ", " ").strip()]
            for p in params.split(",")]
        assert c_args == [a.__name__ for a in argtypes], name
