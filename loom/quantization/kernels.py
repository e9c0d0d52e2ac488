"""Matmul kernels for loom's int8/int4 weight-only Linears, chosen per device in one place (`choose_kernel`) so
that a faster kernel can replace one without touching the modules.

Measured on this project's CPUs (batch-1 matvec, 2 threads, fp32 F.linear = 1x): fbgemm's dynamic-quantization
int8 Linear is several times faster than fp32, while `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`,
compiled dequantize-then-matmul and bitsandbytes' CPU layers are all slower. fbgemm quantizes the activations to a
7-bit per-tensor grid, which alone costs 2-8% relative error when activations have outliers; `fbgemm_int8`
therefore sends second rows holding the rounding residual (scaled up) through the same call, so the weights are
read once and the result is as accurate as dequantized weights (error from the int8 weights only).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

_FORCED = os.environ.get("LOOM_QUANT_KERNEL")  # "dequantize" forces the fallback everywhere (debugging, tests)


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def choose_kernel(bits: int, device: torch.device) -> str:
    """Name of the kernel a quantized Linear uses on `device`: 'fbgemm_int8', 'int8pack', or 'dequantize'."""
    if _FORCED:
        return _FORCED
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


def int8_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """y = x @ dequant(W).T (bias not included) with the module's chosen kernel."""
    kernel = module.kernel
    shape = x.shape[:-1]
    if kernel == "fbgemm_int8" and x.device.type == "cpu":
        packed = module.packed_weight()
        y = fbgemm_int8_matmul(x.reshape(-1, x.shape[-1]).float(), packed, module.row_sums)
        return y.to(x.dtype).view(*shape, -1)
    weight, scale = module.int8_weight()
    if kernel == "int8pack" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight,
                                                   scale.to(x.dtype))
            return y.view(*shape, -1)
        except (RuntimeError, NotImplementedError):
            module.kernel = "dequantize"  # this build has no such kernel for the device: stop trying
    return F.linear(x, int8_dequantize(weight, scale, x.dtype))


# -- int4 group-wise -------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int values in [-8, 7] -> (out, in/2) uint8, even column in the low nibble."""
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) int8 in [-8, 7]."""
    low = (packed & 15).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1) - 8


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(packed)
    out, groups = scale.shape
    return (q.view(out, groups, -1).to(dtype) * scale.to(dtype)[:, :, None]).view(out, -1)


def int4_matmul(x: torch.Tensor, module) -> torch.Tensor:
    return F.linear(x, int4_dequantize(module.weight, module.weight_scale, x.dtype))
