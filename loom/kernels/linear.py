"""The fast path for plain Linears, applied to a model from outside: `use_kernels_(model)` turns every `nn.Linear`
into a `KernelLinear`, an `nn.Linear` subclass with the same parameters and state dict whose forward picks the
fastest correct product. Model files call their modules (`self.q_proj(x)`) and never see this; hooks, PEFT wrappers
(which wrap any `nn.Linear`) and tensor-parallel styles keep working because the module stays an `nn.Linear`.

The product, on CPU without autograd:
- decode-sized fp32/bf16 inputs: loom::dense_linear (see policy.py for when);
- fp32 inputs of more rows (prefill, encoders) where the kernel level has loom's blocked fp32 GEMM (AVX-512):
  loom::dense_linear too, about 2x torch's MKL sgemm on AMD CPUs and closer to the float64 product;
- bf16 where torch emulates bf16: the product in fp32 on a transient fp32 copy of the weight (exact bf16 inputs,
  fp32 sums, one rounding to bf16: what a bf16 matmul computes), ~5x faster than the emulation.
Anything else (training, CUDA, DTensor weights, mixed dtypes, torch.compile beyond the operator) is F.linear.
(Earlier sessions took W @ x.T for 2-64 fp32 rows, 1.5-2x F.linear on an AVX2 Zen 1 machine. Its result depends on
where the weight sits in memory: the BLAS picks its kernel by alignment, so a loaded model and the same model in
memory differed in the last bit. On this AVX-512 machine it was no faster above 2 rows, and those go to the kernel.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels import ops, policy


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if policy.dense_applies(x, weight, bias):
        return ops.dense_linear(x, weight, bias)
    if (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and policy.EMULATED_BF16
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and policy.plain(x)
            and policy.plain(weight) and (bias is None or policy.plain(bias))):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).bfloat16()
    return F.linear(x, weight, bias)


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
        return (policy.plain(w) and w.dtype is dtype and policy.enabled()
                and (rows <= policy.MAX_ROWS or (dtype is torch.float32 and policy.fp32_gemm_takes(rows, *w.shape)))
                and not self._forward_hooks and not self._forward_pre_hooks and "forward" not in self.__dict__
                and not nn.modules.module._global_forward_hooks
                and not nn.modules.module._global_forward_pre_hooks)


def linear_act(linear: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(linear(x)). The exact GELU (`nn.GELU()`) after loom's own Linear in inference, on more fp32 rows than
    decode sizes where the blocked GEMM takes them, is one loom::dense_gelu call: the activation is applied while
    each output block is still in cache instead of in a second pass over the whole intermediate (an encoder's up
    projection: ~5% of MiniLM's time was torch's GELU). A hooked or replaced module runs as written."""
    if (type(act) is nn.GELU and act.approximate == "none" and type(linear) is KernelLinear
            and x.dtype is torch.float32 and not torch.is_grad_enabled() and policy.plain(x)
            and not act._forward_hooks and not act._forward_pre_hooks and "forward" not in act.__dict__):
        rows, b = policy.rows_of(x), linear.bias
        if (rows > policy.MAX_ROWS and linear.uses_kernels(rows, torch.float32)
                and (b is None or policy.plain(b) and b.dtype is torch.float32)):
            return ops.dense_gelu(x, linear.weight, b)
    return act(linear(x))


def is_plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` itself or loom's kernel Linear (not a quantized or adapter subclass)."""
    return type(module) is nn.Linear or type(module) is KernelLinear


def use_kernels_(model: nn.Module) -> nn.Module:
    """Give every plain `nn.Linear` of `model` loom's fast path, in place (parameters untouched)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = KernelLinear
    return model
