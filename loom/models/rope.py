"""Rotary position embeddings with the reference's RoPE types: default, linear, llama3, dynamic (NTK), yarn and
longrope, from a config's `rope_parameters` (5.x) or legacy `rope_theta` / `rope_scaling` fields.

`yarn` and `longrope` scale cos/sin by an attention factor. `dynamic` and `longrope` depend on the longest position
seen: `dynamic` grows its base when a forward reaches past `max_position_embeddings` and keeps it until a forward
is back under the original length (the reference's rule, state included, so cached keys match); `longrope` uses
its long factors whenever the current sequence is longer than `original_max_position_embeddings`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from loom.kernels import ops, policy

# keys each type needs beyond rope_theta
_REQUIRED = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": (),
             "longrope": ("long_factor", "short_factor"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")  # types that read original_max_position_embeddings


def rope_parameters(config, params: dict | None = None) -> dict:
    """One layer type's rope settings in the 5.x `rope_parameters` form (also from legacy rope_theta/rope_scaling),
    with the defaults the reference fills in; a type or a missing key it cannot honour is a ValueError."""
    if params is None:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    if getattr(config, "partial_rotary_factor", None) is not None:
        params.setdefault("partial_rotary_factor", config.partial_rotary_factor)
    kind = params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    where = f"{config._name_or_path}: " if getattr(config, "_name_or_path", "") else ""
    if kind not in _REQUIRED:
        raise ValueError(f"{where}config rope_parameters['rope_type']={kind!r} is not supported; loom supports "
                         f"{', '.join(repr(k) for k in _REQUIRED)}")
    if kind in _ORIGINAL_LENGTH:
        # Phi-3 keeps the pretraining length beside rope_scaling; it wins there, as in the reference
        top = getattr(config, "original_max_position_embeddings", None)
        if top is not None:
            params["original_max_position_embeddings"] = top
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    missing = [k for k in _REQUIRED[kind] if params.get(k) is None]
    if missing:
        raise ValueError(f"{where}config rope_parameters (rope_type {kind!r}) lacks {', '.join(missing)}; add it to "
                         "rope_parameters (or rope_scaling) in config.json")
    return params


def _exponents(dim: int) -> torch.Tensor:
    # explicit CPU: this also runs while a model is built under torch.device("meta"), where math would go through
    # meta decompositions (and import torch._dynamo, seconds of startup)
    return torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(params: dict, dim: int, max_positions: int, seq_len: torch.Tensor | None = None):
    """(inverse frequencies, cos/sin scale) for one rope type; `seq_len` only for dynamic's growth."""
    base = float(params["rope_theta"])
    kind = params["rope_type"]
    if kind == "dynamic":
        factor = float(params["factor"])
        if seq_len is not None:  # growth: the reference computes the new base in float32 tensors
            n = torch.maximum(seq_len.cpu(), torch.tensor(max_positions, device="cpu"))
            base = base * ((factor * n / max_positions) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** _exponents(dim)), 1.0
    inv_freq = 1.0 / (base ** _exponents(dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(params["factor"]), 1.0
    old_len = params.get("original_max_position_embeddings")
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    factor = params.get("factor") or max_positions / old_len
    scale = params.get("attention_factor")
    if kind == "yarn":
        if scale is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            scale = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
        return _yarn(params, dim, base, float(factor), old_len), float(scale)
    # longrope: (short, long) frequency sets, chosen per forward by the sequence length
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    sets = []
    for key in ("short_factor", "long_factor"):
        ext = torch.tensor(params[key], dtype=torch.float32, device="cpu")
        if ext.shape != (dim // 2,):
            raise ValueError(f"config rope_parameters['{key}'] has {ext.numel()} entries; this model's rotary "
                             f"dimension {dim} needs {dim // 2}")
        sets.append(1.0 / (ext * base ** _exponents(dim)))
    return torch.stack(sets), float(scale)


def _yarn(params: dict, dim: int, base: float, factor: float, old_len: int) -> torch.Tensor:
    """YaRN: interpolate the low frequencies, keep the high ones, with a linear ramp between."""
    def correction_dim(rotations):
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** _exponents(dim)
    keep = 1 - ramp
    return 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, computed in float32 and cast to the activations' dtype.

    Returns (cos, sin) of shape (B, 1, T, D_rot), ready to broadcast over heads, with rotate-half's sign folded into
    sin (its first half is negated), so `apply_rotary` needs only a swap of the two halves. Computed once per forward
    for all layers. `params` overrides the config's settings (per-layer-type RoPE).
    """

    def __init__(self, config, head_dim: int, params: dict | None = None) -> None:
        super().__init__()
        self.params = rope_parameters(config, params)
        self.dim = int(head_dim * float(self.params.get("partial_rotary_factor", 1.0)))
        self.max_positions = config.max_position_embeddings
        inv_freq, self.scaling = rope_inv_freq(self.params, self.dim, self.max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._grown_to = self.max_positions  # dynamic: the length the current frequencies were grown for

    def _init_buffers(self, device=None) -> None:
        """Recompute the non-persistent buffer on `device` (after meta-device construction and loading)."""
        inv_freq, self.scaling = rope_inv_freq(self.params, self.dim, self.max_positions)
        self.inv_freq = inv_freq.to(device or "cpu")
        self._grown_to = self.max_positions

    def _frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        kind, inv_freq = self.params["rope_type"], self.inv_freq
        if kind == "longrope":
            longer = position_ids.max() + 1 > self.params["original_max_position_embeddings"]
            return torch.where(longer, inv_freq[1], inv_freq[0])
        if kind == "dynamic" and position_ids.device.type != "meta":
            seq_len = position_ids.max() + 1
            if seq_len > self._grown_to:  # the reference's growth, then its reset below the original length
                inv_freq, self.scaling = rope_inv_freq(self.params, self.dim, self.max_positions, seq_len)
                self.inv_freq = inv_freq.to(self.inv_freq.device)
                self._grown_to = int(seq_len)
            elif seq_len < self.max_positions < self._grown_to:
                self._init_buffers(self.inv_freq.device)
            return self.inv_freq
        return inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._frequencies(position_ids)
        if inv_freq.device != position_ids.device:  # built on meta (the buffer stays on CPU) and run on meta/fake
            inv_freq = inv_freq.to(position_ids.device)
        freqs = position_ids[:, None, :, None].float() * inv_freq.float()  # (B, 1, T, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] on the last dim (rotate-half without its sign, which `RotaryEmbedding` puts in sin)."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate (B, H, T, D) queries and (B, Hkv, T, D) keys with `RotaryEmbedding`'s (B, 1, T, D_rot) cos/sin.

    Plain CPU tensors rotated over the whole head dim go to loom::rope (one pass each, forward and backward);
    otherwise q and k are rotated as one tensor (one concatenation instead of a second set of ops). Bitwise the
    reference's q * cos + rotate_half(q) * sin: the sign moved into sin is an exact negation."""
    heads, rot = q.shape[1], cos.shape[-1]
    if rot == q.shape[-1] and policy.rope_applies(q, cos, sin) and policy.rope_applies(k, cos, sin):
        return ops.rope(q, cos, sin), ops.rope(k, cos, sin)  # one C pass each, bitwise the ops below
    x = torch.cat((q, k), 1)
    if rot == x.shape[-1]:
        x = x * cos + _swap_halves(x) * sin
    else:
        x_rot = x[..., :rot]
        x = torch.cat((x_rot * cos + _swap_halves(x_rot) * sin, x[..., rot:]), -1)
    return x[:, :heads], x[:, heads:]
