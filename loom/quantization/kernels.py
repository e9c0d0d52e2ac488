"""Matmul kernels for loom's int8/int4 weight-only Linears, chosen per device in one place (`choose_kernel`) so
that a faster kernel can replace one without touching the modules.

On x86-64 Linux CPUs with AVX2/FMA the 'native' kernels (the operators loom::int8_linear and loom::int4_linear of
`loom.kernels`) read the int8 or packed int4 weights directly: exact weight-only math up to the int16 rounding of
the activations, memory-bound at decode batch sizes, with autograd to the input. Measured on the project's AMD AVX2
machine they beat fbgemm's dynamic int8 Linear (which also quantizes the activations, so it needs a second residual
pass to stay accurate) and fp32 F.linear at small batches. For large batches (prefill, encoders) int8 and int4
each have a blocked integer GEMM that never expands the whole weight (1.6-3x faster than dequantizing + F.linear;
int4 for group sizes `loom.kernels.policy.int4_applies` takes). Elsewhere the torch paths
below are used: fbgemm for int8 on CPU, PyTorch's int8 kernel on CUDA, dequantize-then-matmul everywhere else.
`LOOM_QUANT_KERNEL=<name>` forces one (debugging, tests). An int4 Linear switched to 8-bit activations
(`loom.quantization.set_activation_bits`) takes loom::int4_linear_a8 for products of up to MAX_ROWS rows on any CPU
(its torch path where the kernels are off) and the torch reference of the same arithmetic elsewhere.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from loom.kernels import ops, policy


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def choose_kernel(bits: int, device: torch.device, group_size: int = 0) -> str:
    """Name of the kernel a quantized Linear uses on `device`: 'native', 'fbgemm_int8', 'int8pack' or
    'dequantize'."""
    forced = os.environ.get("LOOM_QUANT_KERNEL")
    if forced:
        return forced
    if device.type == "cpu" and (bits == 8 or group_size % 16 == 0) and policy.enabled():
        return "native"
    if bits == 8 and device.type == "cpu" and fbgemm_available():
        return "fbgemm_int8"
    if bits == 8 and device.type == "cuda":
        return "int8pack"
    return "dequantize"


# -- int8 per-output-channel -----------------------------------------------------------------------------------
def pack_fbgemm(weight: torch.Tensor, scale: torch.Tensor):
    """fbgemm's prepacked form of an int8 (out, in) weight with per-row scales (the weight is then not needed)."""
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        q = torch._make_per_channel_quantized_tensor(weight.cpu(), scale.double().cpu(), zeros, 0)
    return torch.ops.quantized.linear_prepack(q, None)


def unpack_fbgemm(packed) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.ops.quantized.linear_unpack(packed)
    return q.int_repr(), q.q_per_channel_scales().float()


def fbgemm_int8_matmul(x2d: torch.Tensor, packed, row_sums: torch.Tensor) -> torch.Tensor:
    """x2d (M, K) float32 @ packed int8 weight, activations kept exact to ~1/16000 of their range.

    fbgemm puts the whole input on one 7-bit grid (reduce_range on x86). Rows 0..M-1 are x already on that grid,
    so fbgemm sees them exactly; rows M..2M-1 are the rounding residual (within +-step/2) stretched by 127 and
    centred on the grid's span, so the same grid quantizes them finely. `row_sums` (W @ 1) removes the centre.
    """
    lo, hi = torch.aminmax(x2d)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    step = ((hi - lo) / 127).clamp(min=1e-30)
    zero = torch.round(-lo / step)
    on_grid = (torch.clamp(torch.round(x2d / step) + zero, 0, 127) - zero) * step
    centre = (lo + hi) / 2
    residual = ((x2d - on_grid) * 127 + centre).clamp(lo, hi)  # rounding must not widen the grid
    both = torch.ops.quantized.linear_dynamic(torch.cat([on_grid, residual]), packed, True)
    m = x2d.shape[0]
    return both[:m] + (both[m:] - centre * row_sums) / 127


def int8_dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.to(dtype) * scale.to(dtype)[:, None])


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def int8_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """y = x @ dequant(W).T (bias not included) with the module's chosen kernel."""
    kernel = module.kernel
    shape = x.shape[:-1]
    if kernel != "native" and x.requires_grad and torch.is_grad_enabled():
        # fbgemm's and int8pack's products give x no gradient: a backward through them (adapters below a
        # quantized layer) takes the differentiable dequantized product instead
        kernel = "dequantize"
    if kernel == "native" and policy.int8_applies(x):
        return ops.int8_linear(x, module.weight, module.weight_scale)
    if kernel == "fbgemm_int8" and x.device.type == "cpu":
        packed = module.packed_weight()
        y = fbgemm_int8_matmul(_rows(x).float(), packed, module.row_sums)
        return y.to(x.dtype).view(*shape, -1)
    weight, scale = module.int8_weight()
    if kernel == "int8pack" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            y = torch.ops.aten._weight_int8pack_mm(_rows(x).contiguous(), weight, scale.to(x.dtype))
            return y.view(*shape, -1)
        except (RuntimeError, NotImplementedError):
            module.kernel = "dequantize"  # this build has no such kernel for the device: stop trying
    return F.linear(x, int8_dequantize(weight, scale, x.dtype))


# -- int8 group-wise (GGUF Q8_0) ----------------------------------------------------------------------------------
def choose_int8_group_kernel(device: torch.device) -> str:
    """'native' (loom::int8_group_linear's C kernel), 'torch' (the same operator's torch path, the same bits, where
    the kernels are off) or 'dequantize' (off the CPU)."""
    forced = os.environ.get("LOOM_QUANT_KERNEL")
    if forced in ("native", "torch", "dequantize"):
        return forced
    if device.type != "cpu":
        return "dequantize"
    return "native" if policy.enabled() else "torch"


def int8_group_matmul(x: torch.Tensor, module) -> torch.Tensor:
    if module.kernel in ("native", "torch") and policy.int8_group_applies(x, module.group_size):
        return ops.int8_group_linear(x, module.weight, module.weight_scale, module.group_size)
    return F.linear(x, ops.int8_group_dequantize(module.weight, module.weight_scale, x.dtype))


# -- int4 group-wise -------------------------------------------------------------------------------------------
pack_int4 = ops.pack_int4
unpack_int4 = ops.unpack_int4


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                    zero: torch.Tensor | None = None) -> torch.Tensor:
    """w = (nibble - zero) * scale per group, computed in float32; zero None is the symmetric layout (zero 8)."""
    return ops.int4_dequantize_reference(packed, scale, zero).to(dtype)


def int4_matmul(x: torch.Tensor, module) -> torch.Tensor:
    zero = module.zero_point
    if (getattr(module, "activation_bits", 16) == 8 and 0 < policy.rows_of(x) <= policy.MAX_ROWS
            and x.is_floating_point()):
        # decode sizes with 8-bit activations: the operator (its C kernel, or its torch path with the same bits
        # where the kernels are off); more rows (prefill) keep the int16 blocked GEMM below
        if x.is_cpu:
            return ops.int4_linear_a8(x, module.weight, module.weight_scale, zero, module.group_size,
                                      module.a8_tiles())
        return ops.int4_a8_reference(x, module.weight, module.weight_scale, zero, module.group_size)
    if module.kernel == "native" and policy.plain(x):
        if policy.int4_applies(x, module.group_size):
            # decode sizes read the module's tiles where it keeps them (Int4Linear.wants_tiles)
            tiles = module.decode_tiles() if policy.rows_of(x) <= policy.MAX_ROWS else None
            return ops.int4_linear(x, module.weight, module.weight_scale, zero, module.group_size, tiles)
        weight = ops.int4_dequantize(module.weight, module.weight_scale, zero, module.group_size)
        return F.linear(x, weight.to(x.dtype))
    return F.linear(x, int4_dequantize(module.weight, module.weight_scale, x.dtype, zero))
