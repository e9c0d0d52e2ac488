"""compressed-tensors' tensor layouts, read and written without the compressed-tensors package.

`pack-quantized`: integer weights of `num_bits` (1-8) as a dense little-endian bit stream along the input dimension,
32 bits per int32 word (`weight_packed`, (out, ceil(in * bits / 32))); element i of a row starts at bit i * bits and
is stored offset by 2**(bits-1) (so 4-bit q in [-8, 7] is the nibble q + 8). Asymmetric zero points are integers
packed the same way along the output dimension (`weight_zero_point`, (ceil(out * bits / 32), groups)).
`weight_shape` holds (out, in). `int-quantized` stores the signed integers unpacked as int8 `weight`;
`float-quantized` stores float8 `weight`.

Dequantization (the format's definition): w = (q - zero_point) * scale, the scale (and zero point) broadcast per
tensor, per output channel, per group of `group_size` inputs (column j in group g_idx[j] with act-order), or per
block.

For 4 and 8 bits the stream is plain bytes: a 4-bit row is loom's int4 nibble layout (even column in the low
nibble) and an 8-bit row is q + 128 byte by byte, so both map onto loom's kernels by reinterpreting the bytes.
"""
from __future__ import annotations

import sys

import torch

from loom.quantization import kernels


def _bytes(packed: torch.Tensor, what: str) -> torch.Tensor:
    if packed.dtype != torch.int32:
        raise ValueError(f"{what}: packed integers are stored as int32, found {packed.dtype}; the checkpoint's "
                         "tensors do not match its quantization_config")
    if sys.byteorder != "little":
        raise RuntimeError("reading int32-packed quantized weights needs a little-endian CPU")
    return packed.contiguous().view(torch.uint8)


def unpack_unsigned(packed: torch.Tensor, num_bits: int, cols: int, what: str) -> torch.Tensor:
    """(rows, words) int32 -> (rows, cols) uint8 stored values (signed value + 2**(num_bits-1))."""
    data = _bytes(packed, what)
    rows = data.shape[0]
    if data.shape[1] * 8 < cols * num_bits:
        raise ValueError(f"{what}: {tuple(packed.shape)} int32 words hold fewer than {cols} values of {num_bits} bits")
    if num_bits == 8:
        return data[:, :cols].contiguous()
    if num_bits == 4:
        return torch.stack((data & 15, data >> 4), dim=-1).reshape(rows, -1)[:, :cols].contiguous()
    bits = (data[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (rows, bytes, 8), bit 8*byte + j
    bits = bits.reshape(rows, -1)[:, :cols * num_bits].reshape(rows, cols, num_bits).to(torch.int32)
    return (bits << torch.arange(num_bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_signed(packed: torch.Tensor, num_bits: int, cols: int, what: str) -> torch.Tensor:
    """(rows, words) int32 -> (rows, cols) int16 signed values."""
    return unpack_unsigned(packed, num_bits, cols, what).to(torch.int16) - (1 << (num_bits - 1))


def unpack_zero_point(packed: torch.Tensor, num_bits: int, out_features: int, what: str) -> torch.Tensor:
    """(ceil(out * bits / 32), groups) int32 packed along dim 0 -> (out, groups) int16."""
    return unpack_signed(packed.t(), num_bits, out_features, what).t().contiguous()


def pack_bytes(data: torch.Tensor) -> torch.Tensor:
    """(rows, n) uint8 stream bytes -> (rows, ceil(n / 4)) int32 words (zero-padded)."""
    pad = (-data.shape[1]) % 4
    if pad:
        data = torch.cat([data, data.new_zeros(data.shape[0], pad)], dim=1)
    return data.contiguous().reshape(-1).view(torch.int32).reshape(data.shape[0], -1)  # rows of one: any stride


def pack_unsigned(u: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(rows, cols) uint8 stored values of 4 or 8 bits -> (rows, ceil(cols * bits / 32)) int32 words."""
    if num_bits == 4:
        if u.shape[1] % 2:
            u = torch.cat([u, u.new_zeros(u.shape[0], 1)], dim=1)
        u = kernels.pack_int4(u)
    return pack_bytes(u.to(torch.uint8))


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 -> pack-quantized 8-bit int32 words."""
    return pack_unsigned((q.to(torch.int16) + 128).to(torch.uint8), 8)


def pack_zero_point_int4(zero: torch.Tensor) -> torch.Tensor:
    """(out, groups) signed 4-bit zero points -> (ceil(out / 8), groups) int32, packed along the output dim."""
    return pack_unsigned((zero.to(torch.int16) + 8).to(torch.uint8).t(), 4).t().contiguous()


def expand_per_input(t: torch.Tensor, out_features: int, in_features: int, strategy: str, group_size: int | None,
                     block: list[int] | None, g_idx: torch.Tensor | None) -> torch.Tensor:
    """A scale or zero point broadcast to the weight's (out, in) shape, by the scheme's strategy."""
    if strategy == "tensor":
        return t.reshape(1, 1).expand(out_features, in_features)
    if strategy == "channel":
        return t.reshape(out_features, 1).expand(out_features, in_features)
    if strategy == "group":
        if g_idx is not None:
            return t[:, g_idx.long()]
        return t.repeat_interleave(group_size, dim=1)[:, :in_features]
    if strategy == "block":
        rows, cols = block
        return t.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)[:out_features, :in_features]
    raise ValueError(f"weight quantization strategy {strategy!r} is not supported")


def compressed_module_tensors(module, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors (local names) of a loom Int8Linear or Int8GroupLinear, or an Int4Linear with
    integer zero points."""
    shape = torch.tensor([module.out_features, module.in_features])
    if module.bits == 8 and getattr(module, "group_size", None):  # group-wise int8 (Int8GroupLinear)
        # float32 scales by default: readers form q * scale in the scale's dtype, exact in float32 for the float16
        # scales GGUF's Q8_0 holds, rounded in float16
        return {"weight_packed": pack_int8(module.weight), "weight_scale": module.weight_scale.to(scale_dtype),
                "weight_shape": shape}
    if module.bits == 8:
        q, scale = module.int8_weight()
        return {"weight_packed": pack_int8(q), "weight_scale": scale.to(scale_dtype)[:, None],
                "weight_shape": shape}
    out = {"weight_packed": pack_bytes(module.weight), "weight_scale": module.weight_scale.to(scale_dtype),
           "weight_shape": shape}
    zero = module.zero_point
    if zero is not None:
        if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > 15:
            raise ValueError("compressed-tensors stores integer zero points in [0, 15]; this Int4Linear has "
                             "fractional ones (asymmetric int4 from an older loom file)")
        out["weight_zero_point"] = pack_zero_point_int4(zero - 8)
    return out


def to_compressed_tensors(model, names: list[str], tensors: dict[str, torch.Tensor],
                          scale_dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """A checkpoint state dict with loom's quantized tensors of `names` replaced by compressed-tensors' layout."""
    tensors = dict(tensors)
    for name in names:
        for attr in ("weight", "weight_scale", "weight_zero"):
            tensors.pop(f"{name}.{attr}", None)
        module = model.get_submodule(name)
        for attr, t in compressed_module_tensors(module, scale_dtypes.get(name, torch.float32)).items():
            tensors[f"{name}.{attr}"] = t
    return tensors
