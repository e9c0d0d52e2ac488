"""loom.models.common.linear: the decode-sized inference kernels (loom's C kernel for fp32/bf16 up to
NATIVE_MAX_ROWS rows, W @ x.T for fp32 up to SKINNY_MAX_ROWS) equal nn.Linear, and everything they must not take
(hooks, Linear subclasses, autograd, mixed dtypes) still goes through the module's own call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loom import native
from loom.models.common import NATIVE_MAX_ROWS, SKINNY_MAX_ROWS, linear

needs_native = pytest.mark.skipif(native.library() is None, reason="loom's C kernels need Linux x86-64 with "
                                  "AVX2/FMA/F16C and a C compiler")


def _linear(bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(48, 40, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 48), (3, 5, 48), (8, 1, 48), (1, SKINNY_MAX_ROWS + 3, 48)])
def test_matches_f_linear(bias, shape):
    module = _linear(bias)
    x = torch.randn(shape)
    with torch.no_grad():
        got = linear(module, x)
        want = F.linear(x, module.weight, module.bias)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _Counting(nn.Linear):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_module_call_kept_where_the_fast_path_does_not_apply():
    x = torch.randn(4, 48)
    sub = _Counting(48, 40)  # quantized Linears are subclasses: their forward must run
    with torch.no_grad():
        linear(sub, x)
    assert _Counting.calls == 1

    module = _linear(True)
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        linear(module, x)
    handle.remove()
    assert seen == [torch.Size([4, 40])]


def test_autograd_and_mixed_dtypes_use_the_module():
    module = _linear(True)
    x = torch.randn(4, 48, requires_grad=True)
    out = linear(module, x)  # grad enabled: the module's own call, so gradients flow
    out.sum().backward()
    assert x.grad is not None and module.weight.grad is not None
    with torch.no_grad(), pytest.raises(RuntimeError):
        linear(module.to(torch.bfloat16), torch.randn(4, 48))  # as nn.Linear itself: dtypes must match


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, NATIVE_MAX_ROWS])
@pytest.mark.parametrize("features", [(64, 37), (21, 19), (768, 130)])  # in-features not a multiple of 16: tail path
def test_native_kernel_matches_f_linear(dtype, bias, rows, features):
    k, n = features
    torch.manual_seed(rows)
    module = nn.Linear(k, n, bias=bias).to(dtype)
    x = torch.randn(rows, 1, k, dtype=dtype)
    with torch.no_grad():
        got = linear(module, x)
        exact = F.linear(x.double(), module.weight.double(), None if module.bias is None else module.bias.double())
    assert got.dtype == dtype and got.shape == (rows, 1, n) and got.is_contiguous()
    # fp32: sums in another order than the BLAS; bf16: one rounding of the fp32 sum, as torch's bf16 matmul does
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got.double(), exact, **tol)


@needs_native
def test_native_kernel_rounds_bf16_like_torch():
    torch.manual_seed(0)
    x, w = torch.randn(3, 256), torch.randn(70, 256)
    y = native.dense_gemm(x, w, None)  # fp32 in, fp32 out
    yb = native.dense_gemm(x.bfloat16(), w.bfloat16(), None)
    want = F.linear(x.bfloat16().float(), w.bfloat16().float())  # the same products, summed in fp32
    torch.testing.assert_close(yb, want.bfloat16(), rtol=0, atol=0.02)
    assert (yb.float() - want).abs().max() <= want.abs().max() * 2 ** -8  # at most one bf16 rounding
    special = torch.tensor([[float("inf"), 1.0] + [0.0] * 14, [float("nan")] + [0.0] * 15])
    out = native.dense_gemm(special.bfloat16(), torch.ones(2, 16, dtype=torch.bfloat16), None)
    assert out[0].isinf().all() and out[1].isnan().all()
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)


@needs_native
def test_native_kernel_takes_noncontiguous_inputs():
    module = _linear(True)
    x = torch.randn(48, 6).t()  # (6, 48), not contiguous
    with torch.no_grad():
        torch.testing.assert_close(linear(module, x), F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_the_c_library_the_torch_paths_are_used(monkeypatch, dtype):
    monkeypatch.setattr(native, "_state", {"lib": None})  # as on a machine where it cannot be built
    module = _linear(True).to(dtype)
    x = torch.randn(4, 48, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(linear(module, x), F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [NATIVE_MAX_ROWS + 1, SKINNY_MAX_ROWS + 1])
def test_bf16_beyond_the_native_kernel_matches_a_bf16_matmul(rows):
    module = _linear(True).to(torch.bfloat16)
    x = torch.randn(rows, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        got = linear(module, x)
    exact = F.linear(x.double(), module.weight.double(), module.bias.double())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()  # one rounding of an fp32 sum
