"""The fast path for plain Linears, applied to a model from outside: `use_kernels_(model)` turns every `nn.Linear`
into a `KernelLinear`, an `nn.Linear` subclass with the same parameters and state dict whose forward picks the
fastest correct product. Model files call their modules (`self.q_proj(x)`) and never see this; hooks, PEFT wrappers
(which wrap any `nn.Linear`) and tensor-parallel styles keep working because the module stays an `nn.Linear`.

The product, on CPU without autograd:
- decode-sized fp32/bf16 inputs: loom::dense_linear (see policy.py for when);
- fp32 up to SKINNY_MAX_ROWS rows: W @ x.T, ~1.5-2x faster than the BLAS's x @ W.T for skinny inputs;
- bf16 where torch emulates bf16: the product in fp32 on a transient fp32 copy of the weight (exact bf16 inputs,
  fp32 sums, one rounding to bf16: what a bf16 matmul computes), ~5x faster than the emulation.
Anything else (training, CUDA, DTensor weights, mixed dtypes, torch.compile beyond the operator) is F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels import ops, policy

SKINNY_MAX_ROWS = 64


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if policy.dense_applies(x, weight, bias):
        return ops.dense_linear(x, weight, bias)
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or not policy.plain(x) or not policy.plain(weight)
            or weight.dtype is not x.dtype or (bias is not None and not policy.plain(bias))):
        return F.linear(x, weight, bias)
    rows = policy.rows_of(x)
    if rows == 0 or rows > SKINNY_MAX_ROWS and not (x.dtype is torch.bfloat16 and policy.EMULATED_BF16):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if x.dtype is torch.float32:
        out = _skinny(x2, weight, bias)
    elif x.dtype is torch.bfloat16 and policy.EMULATED_BF16:
        xf, wf, bf = x2.float(), weight.float(), None if bias is None else bias.float()
        out = (_skinny(xf, wf, bf) if rows <= SKINNY_MAX_ROWS else F.linear(xf, wf, bf)).bfloat16()
    else:
        return F.linear(x, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _skinny(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())  # (N, M)
    return out.t().contiguous()


class KernelLinear(nn.Linear):
    """`nn.Linear` with loom's inference fast path; identical parameters, state dict and training behaviour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters  # one dict lookup each instead of Module.__getattr__ (~1 us per access)
        w, b = params.get("weight"), params.get("bias")
        if w is None:  # weight replaced by something that is not a parameter (e.g. a parametrization)
            w, b = self.weight, self.bias
        return linear_forward(x, w, b)

    def uses_kernels(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether a `rows`-row product in `dtype` runs in loom's kernel (used by the decode thread hand-off; a
        hooked or replaced forward may do anything, so it says no)."""
        w = self.weight
        return (policy.plain(w) and w.dtype is dtype and rows <= policy.MAX_ROWS and policy.enabled()
                and not self._forward_hooks and not self._forward_pre_hooks and "forward" not in self.__dict__
                and not nn.modules.module._global_forward_hooks
                and not nn.modules.module._global_forward_pre_hooks)


def is_plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` itself or loom's kernel Linear (not a quantized or adapter subclass)."""
    return type(module) is nn.Linear or type(module) is KernelLinear


def use_kernels_(model: nn.Module) -> nn.Module:
    """Give every plain `nn.Linear` of `model` loom's fast path, in place (parameters untouched)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = KernelLinear
    return model
