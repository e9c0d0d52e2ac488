"""loom's weight-only quantized Linear modules: int8 per-output-channel symmetric, int8 group-wise symmetric
(GGUF Q8_0), int4 group-wise asymmetric (default) or symmetric.

State dict: `weight` (int8 (out, in) for both int8 layouts, or uint8 (out, in/2) for int4 with the even column in
the low nibble), `weight_scale` (float32 (out,) for int8; (out, in/group_size) float16 or float32 for group-wise
int8; (out, in/group_size) float16 for asymmetric int4, float32 for symmetric),
`weight_zero` (asymmetric int4 only: float16 (out, in/group_size), in nibble units: integers in [0, 15] when loom
quantizes; older loom_weight_only files hold fractional ones, which the kernels take as well) and an optional float
`bias`.
Moving with `.to(device)` works; casting (`.to(torch.bfloat16)`, `.half()`) raises, since the stored integers
cannot change dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.kernels import ops, policy
from loom.kernels.memory import back_with_huge_pages
from loom.quantization import kernels


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric: scale = max|w_row| / 127, q = round(w / scale) in [-127, 127]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale  # a transposed source (GPT-2's Conv1D) would otherwise keep its strides


_INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric: each run of `group_size` inputs of a row shares one float32 scale, stored nibbles
    q + 8 with q in [-8, 7].

    The scale is max|w| * c / 7 with the clip c (from 1.0 down to 0.7) that minimises the group's squared error:
    with only 16 levels, clipping a few outliers beats stretching the grid over them (~10% lower error).
    """
    out, inp = weight.shape
    w = weight.detach().float().reshape(out, inp // group_size, group_size)
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
    return kernels.pack_int4((best_q + 8).view(out, inp)), best_scale.squeeze(2)


def quantize_int4_asymmetric(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """Group-wise asymmetric: w ~ (q - zero) * scale with q in [0, 15], a float16 scale and an integer zero point
    in [0, 15] (stored as float16) per group. Returns (packed, scale, zero).

    Integer zero points are what GPTQ, AWQ and compressed-tensors store, so these weights save as compressed-tensors
    `pack-quantized` that other loaders read. The grid spans the group's range shrunk to [min * a, max * b] for the
    shrinks a, b in (1.0, 0.9, 0.8); for each, the zero point is round(-min * a / scale) and the scale either the
    min-max one or the smallest that still covers the shrunk range with that integer zero point. The candidate with
    the smallest squared error, measured after rounding the scale to float16, wins (on the ~145M bench
    checkpoint's weights 6.5% more squared error than fractional zero points at group 32).

    On CPU the search runs in loom's C kernel (loom::int4_quantize_asymmetric, bit-identical to the torch search,
    ~7x faster); elsewhere, and with the kernels off, in torch. A group holding NaN or inf, or whose range no
    float16 scale covers, raises ValueError."""
    if policy.plain(weight):
        return ops.int4_quantize_asymmetric(weight, group_size)
    return ops.int4_quantize_asymmetric_reference(weight, group_size)


class _QuantLinear(nn.Linear):
    """An `nn.Linear` to the libraries that look for one (peft wraps it in its LoRA `Linear` as it does a plain
    Linear, so adapters train on top of it), whose `weight` is a buffer of integers. Merging an adapter into it
    (`merge_and_unload`) is not supported: dequantize the model first."""

    _loom_quantized = True
    bits = 0

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel = "dequantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def choose_kernel(self) -> None:
        self.kernel = kernels.choose_kernel(self.bits, self.weight_scale.device, getattr(self, "group_size", 0))
        if self.kernel == "native":  # the C kernels index raw row-major memory
            for name, t in self._buffers.items():
                if t is not None and not t.is_contiguous():
                    self._buffers[name] = t.contiguous()

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=torch.float32))
        if probe.dtype != torch.float32:
            raise TypeError(f"cannot cast a quantized {type(self).__name__} to {probe.dtype}: its weights are "
                            f"{self.bits}-bit integers. Pick the compute dtype when loading (dtype=...), or load the "
                            "full-precision checkpoint to change dtypes")
        result = super()._apply(fn, recurse)
        self.choose_kernel()
        return result

    def uses_kernels(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether a `rows`-row product runs in loom's C kernel (for the thread hand-off of decode and prefill)."""
        return self.kernel == "native" and policy.enabled() and (rows <= policy.MAX_ROWS or self._gemm_in_kernels())

    def _gemm_in_kernels(self) -> bool:
        """Whether products of more rows than decode sizes (prefill) run in a C kernel too."""
        return True

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version (inference-mode tensors keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class Int8Linear(_QuantLinear):
    """y = x @ (int8 W * per-row scale).T + b. With the fbgemm kernel (CPUs without loom's native kernels) a packed
    copy of the weight is made on first use; `weight` stays the int8 tensor."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self._packed = self._packed_stamp = None

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
        """fbgemm's packed weight. The plain int8 `weight` stays beside it (one more byte per weight, on CPUs where
        loom's kernels do not run): code that reads `module.weight` (peft's layer wrapping, a user's inspection)
        must find the tensor, not None."""
        # repacked when the weight or scale tensors were replaced or changed in place since they were packed
        # the stamp holds the tensors themselves, so a replaced one cannot come back under a freed one's id
        stamp = (self.weight, _version(self.weight), self.weight_scale, _version(self.weight_scale))
        old = self._packed_stamp
        if old is None or not all(a is b if torch.is_tensor(a) else a == b for a, b in zip(old, stamp)):
            self.row_sums = self.weight.float().sum(1) * self.weight_scale
            self._packed = kernels.pack_fbgemm(self.weight, self.weight_scale)
            self._packed_stamp = stamp
        return self._packed

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.weight_scale

    def _drop_packed(self) -> None:
        self._packed = self._packed_stamp = None  # repacked from `weight` on next use

    def _apply(self, fn, recurse=True):
        self._drop_packed()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._drop_packed()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Int4Linear(_QuantLinear):
    """y = x @ ((int4 W - zero) * per-group scale).T + b, two weights per byte. Asymmetric (the default) stores a
    float16 scale and zero point per group; symmetric stores a float32 scale and the fixed zero point 8."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 symmetric: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if group_size == -1:
            group_size = in_features
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}; choose a group "
                             "size that divides every quantized layer's input size (e.g. 32, 64, 128)")
        if in_features % 2:
            raise ValueError(f"int4 packs two values per byte, so in_features must be even, got {in_features}")
        self.group_size = group_size
        self.asymmetric = not symmetric
        # 16: activations rounded to int16 per row (the default); 8: int8 per block of 32 at decode sizes
        # (loom.quantization.set_activation_bits). A runtime choice: not in the state dict or the config.
        self.activation_bits = 16
        self._a8 = self._a8_stamp = None  # the tiles' layout while in use (a8_tiles)
        groups = (out_features, in_features // group_size)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        scale_dtype = torch.float16 if self.asymmetric else torch.float32
        self.register_buffer("weight_scale", torch.empty(groups, dtype=scale_dtype, device=device))
        if self.asymmetric:
            self.register_buffer("weight_zero", torch.empty(groups, dtype=torch.float16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False) -> "Int4Linear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, symmetric,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.set_quantized(*new.quantize(linear.weight))
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        new.choose_kernel()
        return new

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(packed, scale[, zero]) of a float weight in this module's layout."""
        if self.asymmetric:
            return quantize_int4_asymmetric(weight, self.group_size)
        return quantize_int4(weight, self.group_size)

    def set_quantized(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        self.weight, self.weight_scale = packed, scale
        if zero is not None:
            self.weight_zero = zero

    @property
    def zero_point(self) -> torch.Tensor | None:
        """Per-group zero points (asymmetric layout), or None for the symmetric layout's fixed zero point 8."""
        return self.weight_zero if self.asymmetric else None

    def _matmul(self, x):
        return kernels.int4_matmul(x, self)

    def _gemm_in_kernels(self) -> bool:
        return policy.int4_gemm_takes(self.group_size)

    def a8_tiles(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weights in the tiled kernels' layout (ops.int4_a8_tiles: 16-row tiles, scales beside the nibbles),
        read by the 8-bit activation kernel and, where `wants_tiles`, by int16 decode-size products; made on first
        use and kept (about the int4 weight's bytes once more); remade when `weight`, `weight_scale` or
        `weight_zero` were replaced or changed in place. The saved layout (`weight`...) is what the state dict
        holds, unchanged. `out`: remake it into this uint8 buffer of the right size (make_tiles puts every layer's
        into one)."""
        if out is None and self.tiles_current():
            return self._a8
        buffers = self._buffers
        w, s, z = buffers["weight"], buffers["weight_scale"], buffers["weight_zero"] if self.asymmetric else None
        tiles = ops.int4_a8_tiles(w.contiguous(), s.contiguous(), None if z is None else z.contiguous(),
                                  self.group_size)
        if out is not None:
            tiles = out.copy_(tiles)
        self._a8, self._a8_stamp = tiles, (w, s, z, _version(w), _version(s), None if z is None else _version(z))
        return tiles

    def tiles_current(self) -> bool:
        """Whether the tiles exist and were made from the weight, scale and zero point the module holds now."""
        buffers, old = self._buffers, self._a8_stamp
        w, s, z = buffers["weight"], buffers["weight_scale"], buffers["weight_zero"] if self.asymmetric else None
        # per call (a decode step's hot path): identity and in-place version of the three tensors
        return (old is not None and old[0] is w and old[1] is s and old[2] is z
                and old[3:] == (_version(w), _version(s), None if z is None else _version(z)))

    def drop_a8_tiles(self) -> None:
        self._a8 = self._a8_stamp = None

    # Whether decode-size products with int16 activations (the default) read the tiles too: their kernel on tiles
    # (csrc/int4a8.c) streams the weights 1.4-2x as fast as the saved layout's, for a second copy of them (about
    # the int4 weight's bytes). False on an instance (or the class) keeps decode on the saved layout.
    tiles_for_decode = True

    def wants_tiles(self) -> bool:
        """Whether this layer's int16 decode-size products run on tiles (a CPU layer on loom's kernels, group size
        a multiple of 32, a kernel level with the tiled int16 kernel, `tiles_for_decode`)."""
        return (self.tiles_for_decode is True and self.kernel == "native" and self.group_size % 32 == 0
                and self.weight.device.type == "cpu" and ops.int4_tiles_int16())

    def decode_tiles(self) -> torch.Tensor | None:
        """The tiles an int16 decode-size product reads (made on first use, see a8_tiles), or None where
        `wants_tiles` says no."""
        return self.a8_tiles() if self.wants_tiles() else None

    def _apply(self, fn, recurse=True):
        self.drop_a8_tiles()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.drop_a8_tiles()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        bits = ", activation_bits=8" if getattr(self, "activation_bits", 16) == 8 else ""
        return super().extra_repr() + f", group_size={self.group_size}, asymmetric={self.asymmetric}{bits}"


class Int8GroupLinear(_QuantLinear):
    """y = x @ (int8 W * per-group scale).T + b: one scale per `group_size` inputs of a row, float16 or float32.
    GGUF's Q8_0 (32 int8 values and a float16 scale per block) is exactly this with group_size=32 and float16
    scales, loaded without re-quantization; compressed-tensors' symmetric int8 `group` scheme too. Runs on
    loom::int8_group_linear, whose torch path (kernels off) computes the same bits."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 scale_dtype: torch.dtype = torch.float16, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if not (group_size > 0 and in_features % group_size == 0 and group_size % 16 == 0
                and group_size <= policy.INT8_GROUP_MAX):
            raise ValueError(f"Int8GroupLinear: group_size={group_size} must be a multiple of 16 up to "
                             f"{policy.INT8_GROUP_MAX} that divides in_features={in_features}")
        if scale_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"Int8GroupLinear: scale_dtype must be float16 or float32, got {scale_dtype}")
        self.group_size = group_size
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // group_size, dtype=scale_dtype,
                                                         device=device))

    def choose_kernel(self) -> None:
        self.kernel = kernels.choose_int8_group_kernel(self.weight_scale.device)
        if self.kernel == "native":
            for name, t in self._buffers.items():
                if t is not None and not t.is_contiguous():
                    self._buffers[name] = t.contiguous()

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.weight_scale

    def _matmul(self, x):
        return kernels.int8_group_matmul(x, self)

    def _gemm_in_kernels(self) -> bool:
        return policy.int8_group_takes(self.group_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight a quantized Linear computes with (for error checks and `dequantize`)."""
    if isinstance(module, Int8GroupLinear):
        return ops.int8_group_dequantize(module.weight, module.weight_scale, dtype)
    if isinstance(module, Int8Linear):
        w, s = module.int8_weight()
        return kernels.int8_dequantize(w, s, dtype)
    if isinstance(module, Int4Linear):
        return kernels.int4_dequantize(module.weight, module.weight_scale, dtype, module.zero_point)
    raise TypeError(f"{type(module).__name__} is not a loom quantized Linear")


def make_tiles(layers: list) -> None:
    """Each int4 layer's tiles (Int4Linear.a8_tiles), made now rather than in the first decode step, in one buffer
    backed by 2 MiB pages where Linux allows (as the loader does for the weights themselves: a decode step streams
    them, and with 4 KiB pages the same bytes read 1.6x slower; most layers' tiles are far smaller than a huge page
    on their own). Nothing is made when every layer's tiles are current and in one buffer already; otherwise all
    are remade into a new one (tiles a forward made one by one, at a short prompt's decode-size products, move)."""
    if not layers or (all(m.tiles_current() for m in layers)
                      and len({m._a8.untyped_storage().data_ptr() for m in layers}) == 1):
        return
    todo = list(layers)
    sizes = [ops.int4_a8_tile_bytes(m.weight, m.weight_scale, m.zero_point) for m in todo]
    arena = torch.empty(sum(sizes), dtype=torch.uint8)
    back_with_huge_pages([arena])  # before the pages are first written
    offset = 0
    for m, size in zip(todo, sizes):  # one layer's temporary copy at a time
        m.a8_tiles(out=arena[offset:offset + size])
        offset += size
