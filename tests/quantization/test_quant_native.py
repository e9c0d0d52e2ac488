"""loom's C weight-only kernels (loom::int8_linear, loom::int4_linear): equal to the torch dequantize reference up
to fp32 rounding (and the int16 rounding of the activations), on the shapes that exercise their edges (row tails, K
tails, batch tiles, the large-batch path), with gradients to the input; and the torch fallback used when they cannot
be built (tests/kernels/test_build.py covers the build itself)."""
from __future__ import annotations

import pytest
import torch
from loomtest import kernels_off_for, kernels_on
from torch import nn

from loom.kernels import ops, policy
from loom.quantization import kernels
from loom.quantization.linear import Int4Linear, Int8Linear, dequantized_weight

needs_native = pytest.mark.skipif(not kernels_on(), reason="the native kernels need Linux x86-64 with "
                                  "AVX2/FMA/F16C and a C compiler; the torch fallback is tested below")


def _close_to_reference(q: nn.Module, rows: int, k: int) -> None:
    x = torch.randn(rows, k) * 3
    with torch.no_grad():
        weight = dequantized_weight(q)
        exact = nn.functional.linear(x, weight, q.bias)
        got = q(x)
    # different summation order: a few fp32 ulps of the largest output
    tol = 1e-5 * exact.abs() + 2e-6 * exact.abs().max()
    kernel_rows = (rows <= policy.MAX_ROWS or isinstance(q, Int8Linear)
                   or (q.bits == 4 and policy.int4_applies(x, q.group_size)))
    if kernel_rows and q.kernel == "native":
        # plus, the int8 and int4 kernels round each x row to int16 (step max|x| / 32767): an output moves by at
        # most half a step times sum_k |w[n, k]|, ~1e-5 of max|x| * sum|w| (fp32 alone would stay within the line
        # above); int4 groups of 16 take the fp32 path, where this only loosens the bound. int4 takes its kernel
        # (the blocked GEMM) for more rows too
        tol = tol + x.abs().amax(dim=1, keepdim=True) / 65534 * weight.abs().sum(dim=1)
    assert ((got - exact).abs() <= tol).all(), (got - exact).abs().max()


def _linear(inp: int, out: int) -> nn.Linear:
    torch.manual_seed(inp * 1000 + out)
    lin = nn.Linear(inp, out)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


@needs_native
@pytest.mark.parametrize("inp,out", [(256, 192), (40, 7), (3072, 10)])  # K tail of 8, N tail of 3, long K
@pytest.mark.parametrize("rows", [1, 3, policy.MAX_ROWS, policy.MAX_ROWS + 5])
def test_int8_native_matches_dequantize(inp, out, rows):
    q = Int8Linear.from_linear(_linear(inp, out))
    assert q.kernel == "native"
    _close_to_reference(q, rows, inp)


@needs_native
def test_int8_native_long_k_does_not_overflow():
    # every product at its largest (|w| 127 and 128, x at max|x| so it rounds to 32767): one int32 lane would pass
    # 2^31 after 4096 columns without the kernel's periodic flush to int64; 8192 + 21 also has a K tail
    k = 8192 + 21
    weight = torch.stack([torch.full((k,), 127), torch.full((k,), -128), torch.full((k,), 127)]).to(torch.int8)
    weight[2, 1::2] = -127
    scale = torch.tensor([1e-3, 2e-3, 1e-3])
    x = torch.full((2, k), 2.5)
    x[1] = -7.0
    got = torch.ops.loom.int8_linear(x, weight, scale)
    exact = x.double() @ (weight.double() * scale.double()[:, None]).T
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())


@needs_native
def test_int8_native_rows_with_inf_or_nan_stay_float():
    # such rows have no int16 scale: they take the fp32 path and propagate inf/NaN as a float matmul does, while
    # the finite rows paired with them in the kernel's two-row blocks are unaffected
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (6, 40), dtype=torch.int8)
    scale = torch.rand(6) * 0.01
    x = torch.randn(4, 40)
    x[1, 3], x[2, 0] = float("inf"), float("nan")
    got = torch.ops.loom.int8_linear(x, weight, scale)
    exact = x @ (weight.float() * scale[:, None]).T
    assert torch.equal(got[1:3].isnan(), exact[1:3].isnan()) and torch.equal(got[1:3].isinf(), exact[1:3].isinf())
    finite = exact[1:3].isfinite()
    torch.testing.assert_close(got[1:3][finite], exact[1:3][finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[[0, 3]], exact[[0, 3]], rtol=1e-4, atol=1e-4 * exact[[0, 3]].abs().max().item())


@needs_native
# groups per row: 8 (one block of the kernel), fp32 path (16), 4, 1, and 10 (a block and a tail of 2)
@pytest.mark.parametrize("inp,out,group,symmetric", [(256, 192, 32, False), (96, 7, 16, False),
                                                     (512, 30, 128, True), (64, 5, 64, True), (320, 9, 32, True),
                                                     (320, 9, 32, False)])
@pytest.mark.parametrize("rows", [1, 3, 4, policy.MAX_ROWS + 1])
def test_int4_native_matches_dequantize(inp, out, group, symmetric, rows):
    q = Int4Linear.from_linear(_linear(inp, out), group, symmetric=symmetric)
    assert q.kernel == "native"
    _close_to_reference(q, rows, inp)


@needs_native
@pytest.mark.parametrize("group", [32, 4096])
def test_int4_native_long_group_does_not_overflow(group):
    # every nibble 15 against x at max|x| (rounds to 32767): one int32 lane of a 4096-column group reaches
    # 128 steps * 4 * 15 * 32767 ~ 2.5e8; scale and zero in float32 (the symmetric layout has zero 8)
    k = 8192
    packed = torch.full((3, k // 2), 0xFF, dtype=torch.uint8)
    packed[1] = 0x0F  # even columns 15, odd columns 0
    scale = torch.tensor([1e-3, 2e-3, 5e-4])[:, None].expand(3, k // group).contiguous()
    x = torch.full((2, k), 2.5)
    x[1, 1::2] = -7.0
    got = torch.ops.loom.int4_linear(x, packed, scale, None, group)
    nib = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(3, k).double()
    exact = x.double() @ ((nib - 8) * scale.double().repeat_interleave(group, dim=1)).T
    # int16 rounding of x: at most max|x| / 65534 per column
    tol = x.abs().amax(dim=1, keepdim=True).double() / 65534 * ((nib - 8).abs() * 2e-3).sum(dim=1)
    assert ((got.double() - exact).abs() <= tol + 1e-6 * exact.abs().max()).all()


@needs_native
@pytest.mark.parametrize("group", [16, 32])  # the fp32 and the int16 path for the finite rows
def test_int4_native_rows_with_inf_or_nan_stay_float(group):
    # as for int8: such rows are computed in fp32 weight by weight, so inf stays inf (a factored zero-point term
    # would give inf - inf = NaN); their finite neighbours in a two-row block are unaffected
    q = Int4Linear.from_linear(_linear(64, 6), group)
    zero = q.weight_zero if q.asymmetric else None
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    x[1, 3], x[2, 0] = float("inf"), float("nan")
    got = torch.ops.loom.int4_linear(x, q.weight, q.weight_scale, zero, group)
    exact = x @ dequantized_weight(q).T
    assert torch.equal(got[1:3].isnan(), exact[1:3].isnan()) and torch.equal(got[1:3].isinf(), exact[1:3].isinf())
    finite = exact[1:3].isfinite()
    torch.testing.assert_close(got[1:3][finite], exact[1:3][finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[[0, 3]], exact[[0, 3]], rtol=1e-4, atol=1e-4 * exact[[0, 3]].abs().max().item())


@needs_native
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_native_dequantize_is_bit_identical(symmetric):
    q = Int4Linear.from_linear(_linear(128, 9), 32, symmetric=symmetric)
    zero = q.weight_zero if q.asymmetric else None
    assert torch.equal(torch.ops.loom.int4_dequantize(q.weight, q.weight_scale, zero, 32), dequantized_weight(q))


@needs_native
def test_int4_quantizer_in_c_matches_torch():
    """Int4Linear quantizes on CPU with the C search, which gives the torch search's bits (the saved checkpoint does
    not depend on the kernels; tests/kernels/test_int4_quantize.py checks the shapes and values in detail)."""
    lin = _linear(256, 96)
    fast = Int4Linear.from_linear(lin, 32)
    packed, scale, zero = torch.ops.loom.int4_quantize_asymmetric.default(lin.weight.detach(), 32)
    want = ops.int4_quantize_asymmetric_reference(lin.weight.detach(), 32)
    assert torch.equal(fast.weight, want[0]) and torch.equal(packed, want[0])
    for got, ref in ((fast.weight_scale, want[1]), (fast.weight_zero, want[2]), (scale, want[1]), (zero, want[2])):
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@needs_native
def test_bf16_activations_use_the_native_kernel():
    q = Int4Linear.from_linear(_linear(64, 6), 32)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        exact = nn.functional.linear(x.float(), dequantized_weight(q), q.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), exact, rtol=1e-2, atol=1e-2)


def test_int4_group_not_a_multiple_of_16_uses_the_torch_path():
    q = Int4Linear.from_linear(_linear(24, 5), 8)
    assert q.kernel != "native"
    _close_to_reference(q, 2, 24)


@pytest.mark.parametrize("forced", ["dequantize", "fbgemm_int8"])
def test_forced_torch_fallback_matches(monkeypatch, forced):
    if forced == "fbgemm_int8" and not kernels.fbgemm_available():
        pytest.skip("this torch build has no fbgemm quantized engine")
    monkeypatch.setenv("LOOM_QUANT_KERNEL", forced)
    q8 = Int8Linear.from_linear(_linear(64, 12))
    q4 = Int4Linear.from_linear(_linear(64, 12), 32)
    assert q8.kernel == forced and q4.kernel == forced
    x = torch.randn(3, 64)
    with torch.no_grad():
        exact8 = nn.functional.linear(x, dequantized_weight(q8), q8.bias)
        torch.testing.assert_close(q4(x), nn.functional.linear(x, dequantized_weight(q4), q4.bias))
        y8 = q8(x)
    # fbgemm also quantizes the activations (~0.3% with its residual pass); dequantize is exact
    assert ((y8 - exact8).norm() / exact8.norm()).item() < (5e-3 if forced == "fbgemm_int8" else 1e-6)


def test_unsupported_platform_falls_back(monkeypatch):
    kernels_off_for(monkeypatch)
    q = Int8Linear.from_linear(_linear(64, 12))
    assert q.kernel == ("fbgemm_int8" if kernels.fbgemm_available() else "dequantize")
    assert Int4Linear.from_linear(_linear(64, 12), 32).kernel == "dequantize"


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 8, policy.MAX_ROWS + 3])
def test_gradient_to_the_input_equals_the_dequantized_path(bits, rows):
    """An adapter trained below a quantized layer needs the gradient through it (QLoRA-style)."""
    lin = _linear(64, 24)
    q = Int8Linear.from_linear(lin) if bits == 8 else Int4Linear.from_linear(lin, 32)
    assert q.kernel == "native"
    x = torch.randn(rows, 64, requires_grad=True)
    g = torch.randn(rows, 24)
    (q(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (nn.functional.linear(x2, dequantized_weight(q), q.bias) * g).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
