"""KernelLinear, the fast path `use_kernels_` gives every plain Linear: loom::dense_linear for fp32/bf16 up to
policy.MAX_ROWS rows, equal to nn.Linear; hooks, autograd and mixed dtypes
behave as nn.Linear does; models built by loom carry it without any model file calling a kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loomtest import kernels_off_for, kernels_on
from torch import nn

from loom.kernels import KernelLinear, is_plain_linear, ops, use_kernels_
from loom.kernels.policy import MAX_ROWS

needs_kernels = pytest.mark.skipif(not kernels_on(), reason="loom's C kernels need Linux x86-64 with "
                                   "AVX2/FMA/F16C and a C compiler")


def _linear(bias: bool, k: int = 48, n: int = 40) -> KernelLinear:
    torch.manual_seed(0)
    return use_kernels_(nn.Sequential(nn.Linear(k, n, bias=bias)))[0]


def test_use_kernels_swaps_plain_linears_only_and_keeps_the_state_dict():
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Sub(4, 4), nn.Sequential(nn.Linear(4, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_kernels_(model)
    assert [type(m) for m in model.modules()][1:] == [KernelLinear, Sub, nn.Sequential, KernelLinear]
    assert isinstance(model[0], nn.Linear) and is_plain_linear(model[0]) and not is_plain_linear(model[1])
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_loom_models_get_it_from_outside(tmp_path):
    from loom import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    assert type(model.model.layers[0].self_attn.q_proj) is KernelLinear and type(model.lm_head) is KernelLinear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 48), (3, 5, 48), (8, 1, 48), (1, 67, 48),
                                   (0, 48)])
def test_matches_f_linear(bias, shape):
    module = _linear(bias)
    x = torch.randn(shape)
    with torch.no_grad():
        got = module(x)
        want = F.linear(x, module.weight, module.bias)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_hooks_run_and_see_the_product():
    module = _linear(True)
    x = torch.randn(4, 48)
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    with torch.no_grad():
        out = module(x)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], out)
    assert module.uses_kernels(1, torch.float32) == kernels_on()
    module.register_forward_hook(lambda *a: None)
    assert not module.uses_kernels(1, torch.float32)  # a hook may do anything: no decode thread hand-off


def test_autograd_and_mixed_dtypes_behave_as_nn_linear():
    module = _linear(True)
    x = torch.randn(4, 48, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None and module.weight.grad is not None
    with torch.no_grad(), pytest.raises(RuntimeError):
        module.to(torch.bfloat16)(torch.randn(4, 48))  # as nn.Linear itself: dtypes must match


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, MAX_ROWS])
@pytest.mark.parametrize("features", [(64, 37), (21, 19), (768, 130)])  # in-features not a multiple of 16: tail path
def test_kernel_matches_f_linear(dtype, bias, rows, features):
    k, n = features
    torch.manual_seed(rows)
    module = _linear(bias, k, n).to(dtype)
    x = torch.randn(rows, 1, k, dtype=dtype)
    with torch.no_grad():
        got = module(x)
        exact = F.linear(x.double(), module.weight.double(), None if module.bias is None else module.bias.double())
    assert got.dtype == dtype and got.shape == (rows, 1, n) and got.is_contiguous()
    # fp32: sums in another order than the BLAS; bf16: one rounding of the fp32 sum, as torch's bf16 matmul does
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got.double(), exact, **tol)


@needs_kernels
def test_kernel_rounds_bf16_like_torch():
    torch.manual_seed(0)
    x, w = torch.randn(3, 256), torch.randn(70, 256)
    y = torch.ops.loom.dense_linear(x, w, None)  # fp32 in, fp32 out
    yb = torch.ops.loom.dense_linear(x.bfloat16(), w.bfloat16(), None)
    want = F.linear(x.bfloat16().float(), w.bfloat16().float())  # the same products, summed in fp32
    torch.testing.assert_close(yb, want.bfloat16(), rtol=0, atol=0.02)
    assert (yb.float() - want).abs().max() <= want.abs().max() * 2 ** -8  # at most one bf16 rounding
    special = torch.tensor([[float("inf"), 1.0] + [0.0] * 14, [float("nan")] + [0.0] * 15])
    out = torch.ops.loom.dense_linear(special.bfloat16(), torch.ones(2, 16, dtype=torch.bfloat16), None)
    assert out[0].isinf().all() and out[1].isnan().all()
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_result_does_not_depend_on_where_the_weight_sits():
    """A loaded model and the same model in memory must agree bitwise: no path may pick its BLAS kernel by the
    weight's alignment (W @ x.T did)."""
    module = _linear(False, 32, 32)
    x = torch.randn(24, 32)  # beyond the kernel's rows: torch's own matmul
    buf = torch.empty(32 * 32 + 16)
    with torch.no_grad():
        want = module(x)
        for offset in range(1, 16):
            moved = buf[offset:offset + 32 * 32].view(32, 32)
            moved.copy_(module.weight)
            assert torch.equal(KernelLinear.forward(_with_weight(module, moved), x), want), offset


def _with_weight(module, weight):
    clone = _linear(False, 32, 32)
    clone.weight = nn.Parameter(weight, requires_grad=False)
    return clone


def test_noncontiguous_inputs():
    module = _linear(True)
    x = torch.randn(48, 6).t()  # (6, 48), not contiguous
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_the_c_library_the_torch_paths_are_used(monkeypatch, dtype):
    kernels_off_for(monkeypatch)  # as on a machine where it cannot be built
    module = _linear(True).to(dtype)
    x = torch.randn(4, 48, dtype=dtype)
    calls = []
    monkeypatch.setattr(ops, "dense_linear", lambda *a: calls.append(a))
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-5)
    assert not calls


@pytest.mark.parametrize("rows", [MAX_ROWS + 1, 65])
def test_bf16_beyond_the_kernel_matches_a_bf16_matmul(rows):
    module = _linear(True).to(torch.bfloat16)
    x = torch.randn(rows, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        got = module(x)
    exact = F.linear(x.double(), module.weight.double(), module.bias.double())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()  # one rounding of an fp32 sum
