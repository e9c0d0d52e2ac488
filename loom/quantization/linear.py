"""loom's weight-only quantized Linear modules: int8 per-output-channel and int4 group-wise, both symmetric.

State dict: `weight` (int8 (out, in), or uint8 (out, in/2) for int4 with the even column in the low nibble),
`weight_scale` (float32 (out,) or (out, in/group_size)) and an optional float `bias`. Moving with `.to(device)`
works; casting (`.to(torch.bfloat16)`, `.half()`) raises, since the stored integers cannot change dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.quantization import kernels


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric: scale = max|w_row| / 127, q = round(w / scale) in [-127, 127]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


_INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric: each run of `group_size` inputs of a row shares one scale, q in [-8, 7].

    The scale is max|w| * c / 7 with the clip c (from 1.0 down to 0.7) that minimises the group's squared error:
    with only 16 levels, clipping a few outliers beats stretching the grid over them (~10% lower error).
    """
    out, inp = weight.shape
    w = weight.detach().float().view(out, inp // group_size, group_size)
    absmax = w.abs().amax(dim=2, keepdim=True).clamp(min=1e-12)
    best_q = best_scale = best_err = None
    for clip in _INT4_CLIPS:
        scale = absmax * (clip / 7)
        q = torch.round(w / scale).clamp_(-8, 7)
        err = (q * scale - w).square_().sum(dim=2, keepdim=True)
        if best_q is None:
            best_q, best_scale, best_err = q, scale, err
        else:
            better = err < best_err
            best_q = torch.where(better, q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.minimum(err, best_err)
    return kernels.pack_int4(best_q.view(out, inp)), best_scale.squeeze(2)


class _QuantLinear(nn.Module):
    _loom_quantized = True
    bits = 0

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel = "dequantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def choose_kernel(self) -> None:
        self.kernel = kernels.choose_kernel(self.bits, self.weight_scale.device)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=torch.float32))
        if probe.dtype != torch.float32:
            raise TypeError(f"cannot cast a quantized {type(self).__name__} to {probe.dtype}: its weights are "
                            f"{self.bits}-bit integers. Pick the compute dtype when loading (dtype=...), or load the "
                            "full-precision checkpoint to change dtypes")
        result = super()._apply(fn, recurse)
        self.choose_kernel()
        return result

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class Int8Linear(_QuantLinear):
    """y = x @ (int8 W * per-row scale).T + b. On CPU the weight lives in fbgemm's packed form once first used."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self._packed = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                  dtype=linear.weight.dtype)
        new.weight, new.weight_scale = quantize_int8(linear.weight)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        new.choose_kernel()
        return new

    def _matmul(self, x):
        return kernels.int8_matmul(x, self)

    def packed_weight(self):
        """fbgemm's packed weight; packing frees the plain int8 copy so the weight is held once."""
        if self._packed is None:
            self.row_sums = self.weight.float().sum(1) * self.weight_scale
            self._packed = kernels.pack_fbgemm(self.weight, self.weight_scale)
            self._buffers["weight"] = None
        return self._packed

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._packed is not None:
            return kernels.unpack_fbgemm(self._packed)[0], self.weight_scale
        return self.weight, self.weight_scale

    def _unpack(self) -> None:
        if self._packed is not None:
            self._buffers["weight"] = kernels.unpack_fbgemm(self._packed)[0]
            self._packed = None

    def _apply(self, fn, recurse=True):
        self._unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = kernels.unpack_fbgemm(self._packed)[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Int4Linear(_QuantLinear):
    """y = x @ (int4 W * per-group scale).T + b, two weights per byte."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if group_size == -1:
            group_size = in_features
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}; choose a group "
                             "size that divides every quantized layer's input size (e.g. 32, 64, 128)")
        if in_features % 2:
            raise ValueError(f"int4 packs two values per byte, so in_features must be even, got {in_features}")
        self.group_size = group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // group_size,
                                                         dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight, new.weight_scale = quantize_int4(linear.weight, new.group_size)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        new.choose_kernel()
        return new

    def _matmul(self, x):
        return kernels.int4_matmul(x, self)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight a quantized Linear computes with (for error checks and `dequantize`)."""
    if isinstance(module, Int8Linear):
        w, s = module.int8_weight()
        return kernels.int8_dequantize(w, s, dtype)
    if isinstance(module, Int4Linear):
        return kernels.int4_dequantize(module.weight, module.weight_scale, dtype)
    raise TypeError(f"{type(module).__name__} is not a loom quantized Linear")
