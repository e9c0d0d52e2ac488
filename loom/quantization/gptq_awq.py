"""GPTQ and AWQ checkpoints, loaded without auto-gptq / gptqmodel / autoawq: repacked at load into loom's int4
layout and run on its kernel, saved back in their own layout.

Both store w = (q - zero) * scale per group of inputs, q unsigned. GPTQ packs q along the inputs (`qweight`
(in * bits / 32, out)), zero points along the outputs (`qzeros` (groups, out * bits / 32); v1 "gptq" stores each
zero minus one), float16 `scales` (groups, out) and `g_idx` (in,), the group of each input. With act-order
(`desc_act`) the groups are not runs of consecutive inputs: loom sorts the inputs by group once at load and
permutes the activations in the forward (`ActOrderInt4Linear`), which leaves the product unchanged. AWQ (GEMM)
packs both q (in, out / 8) and zeros (groups, out / 8) along the outputs, each int32 holding outputs
0, 2, 4, 6, 1, 3, 5, 7 of its eight in nibbles 0..7.

4-bit layers run on loom's int4 kernel with float32 scales and zero points (exact copies of the stored values;
the product is computed in float32). 8-bit GPTQ runs on the int8 kernel when symmetric per output channel
(group_size -1, no act-order); other 8-bit layouts are dequantized at load by the definition above, in float32
(exact), into a plain float Linear that `from_pretrained(dtype=...)` casts like any weight (such a model cannot be
saved back).
"""
from __future__ import annotations

import torch
from torch import nn

from loom.quantization import ct_layout, kernels
from loom.quantization.base import default_skips, replace_module, target_linears
from loom.quantization.gptq_awq_config import AwqConfig, GPTQConfig
from loom.quantization.linear import Int4Linear, Int8Linear
from loom.quantization.prequantized import CollectingQuantizer, mismatch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output AWQ_ORDER[i] of its eight
AWQ_POSITION = tuple(AWQ_ORDER.index(c) for c in range(8))  # the nibble that holds output c


class ActOrderInt4Linear(Int4Linear):
    """An Int4Linear whose inputs were sorted by group at load (GPTQ act-order): y = x[..., input_order] @ W'.T."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("input_order", torch.empty(self.in_features, dtype=torch.long,
                                                        device=kwargs.get("device")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.input_order))


def _check_shape(name: str, t: torch.Tensor, want: tuple[int, ...], field: str) -> None:
    if tuple(t.shape) != want:
        raise mismatch(f"{name}.{field}", f"has shape {tuple(t.shape)}, expected {want}")


class PackedInt4Quantizer(CollectingQuantizer):
    """What GPTQ and AWQ share: targeting, module choice, repacking into loom's modules."""

    tensor_names = ("qweight", "qzeros", "scales", "g_idx", "weight")
    config: GPTQConfig | AwqConfig

    def __init__(self, config, pre_quantized: bool) -> None:
        super().__init__(config, pre_quantized)
        self._scale_dtypes: dict[str, torch.dtype] = {}

    def group_size(self, in_features: int) -> int:
        return in_features if self.config.group_size == -1 else self.config.group_size

    def targets(self, model: nn.Module) -> list[str]:
        return target_linears(model, default_skips(model) + self.config.modules_to_not_convert)

    def prepare_model(self, model: nn.Module) -> None:
        self.converted = self.targets(model)
        for name in self.converted:
            linear = model.get_submodule(name)
            group = self.group_size(linear.in_features)
            if linear.in_features % group:
                raise ValueError(f"{name}: group_size={group} (quantization_config.group_size) does not divide its "
                                 f"in_features={linear.in_features}; the checkpoint does not fit this model")
            new = self.make_module(linear, group)
            if new is None:
                self.dequantized.append(name)
            else:
                replace_module(model, name, new)
        self._attach(model)
        model._transposed_checkpoint_weights = self._transposed

    def make_module(self, linear: nn.Linear, group: int) -> nn.Module | None:
        cls = ActOrderInt4Linear if getattr(self.config, "desc_act", False) else Int4Linear
        return cls(linear.in_features, linear.out_features, linear.bias is not None, group,
                   symmetric=getattr(self.config, "sym", False), device="meta")

    def load_tensor(self, model, name, source, dtype, device):
        module, _, attr = name.rpartition(".")
        if attr == "weight" and module in self._converted_set() and source.dtype.is_floating_point:
            self._keep_float(model, module)  # the writer left this Linear in full precision
            return None
        return super().load_tensor(model, name, source, dtype, device)

    def _keep_float(self, model: nn.Module, name: str) -> None:
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            self.dequantized.remove(name)
        else:
            linear = nn.Linear(old.in_features, old.out_features, old.bias is not None, device="meta")
            linear.bias = old.bias
            replace_module(model, name, linear)
        self.converted.remove(name)

    def set_int4(self, model, name: str, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None) -> None:
        """Fill the module `name` from unsigned q (out, in), zero points and scales (groups, out)."""
        module = model.get_submodule(name)
        self._scale_dtypes[name] = scales.dtype
        scale, zero = scales.t().float().contiguous(), zeros.t().float().contiguous()
        if isinstance(module, ActOrderInt4Linear):
            order = self._input_order(name, g_idx, module.group_size, scale.shape[1])
            q = q[:, order]
            module.input_order = order
        if module.asymmetric:
            module.set_quantized(kernels.pack_int4(q), scale, zero)
        elif torch.all(zero == 8):
            module.set_quantized(kernels.pack_int4(q), scale)
        else:
            raise mismatch(f"{name}.qzeros", "sym=true, but the zero points are not all 8")

    def _input_order(self, name, g_idx, group, groups) -> torch.Tensor:
        g_idx = g_idx.long()
        if tuple(g_idx.shape) != (group * groups,) or g_idx.min() < 0 or g_idx.max() >= groups or \
                not torch.all(torch.bincount(g_idx, minlength=groups) == group):
            raise mismatch(f"{name}.g_idx", f"must give each of the {groups} groups exactly {group} of the "
                           f"{group * groups} inputs")
        return torch.argsort(g_idx, stable=True)

    def checkpoint_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = dict(tensors)
        for name in self.converted:
            module = model.get_submodule(name)
            for attr in ("weight", "weight_scale", "weight_zero", "input_order"):
                tensors.pop(f"{name}.{attr}", None)
            for attr, t in self.stored_tensors(module, self._scale_dtypes[name]).items():
                tensors[f"{name}.{attr}"] = t
        return tensors

    @staticmethod
    def integers(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unsigned q (out, in) in the checkpoint's input order, zero points and scales (out, groups))."""
        if isinstance(module, Int8Linear):
            q, scale = module.int8_weight()
            u = (q.to(torch.int16) + 128).to(torch.uint8)
            return u, torch.full_like(scale, 128)[:, None], scale[:, None]
        u = kernels.unpack_int4(module.weight)
        if isinstance(module, ActOrderInt4Linear):
            u = torch.empty_like(u).index_copy_(1, module.input_order, u)
        zero = module.zero_point if module.asymmetric else torch.full_like(module.weight_scale, 8)
        return u, zero, module.weight_scale


class GPTQQuantizer(PackedInt4Quantizer):
    method = "gptq"
    format_name = "GPTQ"
    config: GPTQConfig

    def make_module(self, linear: nn.Linear, group: int) -> nn.Module | None:
        if self.config.bits == 4:
            return super().make_module(linear, group)
        if self.config.sym and group == linear.in_features and not self.config.desc_act:
            return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        return None

    def required(self, module: str) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales") + (("g_idx",) if self.config.desc_act else ())

    def assemble(self, model, name: str, t: dict[str, torch.Tensor]) -> None:
        module = model.get_submodule(name)
        bits, out, inp = self.config.bits, module.out_features, module.in_features
        groups = inp // self.group_size(inp)
        _check_shape(name, t["qweight"], (inp * bits // 32, out), "qweight")
        _check_shape(name, t["scales"], (groups, out), "scales")
        _check_shape(name, t["qzeros"], (groups, out * bits // 32), "qzeros")
        q = ct_layout.unpack_unsigned(t["qweight"].t(), bits, inp, f"{name}.qweight")  # (out, in)
        zeros = ct_layout.unpack_unsigned(t["qzeros"], bits, out, f"{name}.qzeros").to(torch.int16) + \
            self.config.zero_offset
        g_idx = t.get("g_idx")
        if g_idx is not None and not self.config.desc_act:
            self.late_tensor(model, name, "g_idx", g_idx)
            g_idx = None
        if isinstance(module, Int4Linear):
            self.set_int4(model, name, q, zeros, t["scales"], g_idx)
        elif isinstance(module, Int8Linear):
            if not torch.all(zeros == 128):
                raise mismatch(f"{name}.qzeros", "sym=true, but the zero points are not all 128")
            self._scale_dtypes[name] = t["scales"].dtype
            module.weight = (q.to(torch.int16) - 128).to(torch.int8)
            module.weight_scale = t["scales"].reshape(out).float().clone()
        else:
            group_of = g_idx.long() if g_idx is not None else torch.arange(inp) // self.group_size(inp)
            w = (q.float() - zeros.t()[:, group_of].float()) * t["scales"].t()[:, group_of].float()
            module.weight = nn.Parameter(w.contiguous(), requires_grad=False)

    def late_tensor(self, model, module: str, attr: str, tensor: torch.Tensor) -> None:
        # without act-order g_idx must be the plain grouping, consecutive runs of group_size inputs
        if attr != "g_idx" or self.config.desc_act:
            return super().late_tensor(model, module, attr, tensor)
        inp = model.get_submodule(module).in_features
        if not torch.equal(tensor.long(), torch.arange(inp) // self.group_size(inp)):
            raise mismatch(f"{module}.g_idx", "desc_act=false, but g_idx does not hold consecutive groups "
                           "(an act-order checkpoint needs desc_act=true in quantization_config)")

    def stored_tensors(self, module, scale_dtype) -> dict[str, torch.Tensor]:
        u, zero, scale = self.integers(module)
        bits = self.config.bits
        stored_zero = (zero.round().to(torch.int16) - self.config.zero_offset).to(torch.uint8)
        inp = module.in_features
        order = module.input_order if isinstance(module, ActOrderInt4Linear) else None
        g_idx = torch.arange(inp) // self.group_size(inp)
        if order is not None:
            g_idx = torch.empty_like(g_idx).index_copy_(0, order, torch.arange(inp) // module.group_size)
        return {"qweight": ct_layout.pack_unsigned(u, bits).t().contiguous(),
                "qzeros": ct_layout.pack_unsigned(stored_zero.t().contiguous(), bits),
                "scales": scale.t().to(scale_dtype).contiguous(), "g_idx": g_idx.to(torch.int32)}


class AwqQuantizer(PackedInt4Quantizer):
    method = "awq"
    format_name = "AWQ"
    config: AwqConfig

    def required(self, module: str) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def assemble(self, model, name: str, t: dict[str, torch.Tensor]) -> None:
        module = model.get_submodule(name)
        out, inp = module.out_features, module.in_features
        groups = inp // module.group_size
        if out % 8:
            raise mismatch(name, f"AWQ packs outputs in eights, but out_features={out}")
        _check_shape(name, t["qweight"], (inp, out // 8), "qweight")
        _check_shape(name, t["qzeros"], (groups, out // 8), "qzeros")
        _check_shape(name, t["scales"], (groups, out), "scales")
        q = self._unpack(t["qweight"], f"{name}.qweight").t()  # (out, in)
        self.set_int4(model, name, q, self._unpack(t["qzeros"], f"{name}.qzeros"), t["scales"], None)

    @staticmethod
    def _unpack(packed: torch.Tensor, what: str) -> torch.Tensor:
        """(rows, cols / 8) AWQ words -> (rows, cols) uint8 in output order."""
        rows, words = packed.shape
        nibbles = ct_layout.unpack_unsigned(packed, 4, words * 8, what).view(rows, words, 8)
        return nibbles[..., list(AWQ_POSITION)].reshape(rows, words * 8)

    @staticmethod
    def _pack(u: torch.Tensor) -> torch.Tensor:
        rows, cols = u.shape
        return ct_layout.pack_unsigned(u.view(rows, cols // 8, 8)[..., list(AWQ_ORDER)].reshape(rows, cols), 4)

    def stored_tensors(self, module, scale_dtype) -> dict[str, torch.Tensor]:
        u, zero, scale = self.integers(module)
        return {"qweight": self._pack(u.t().contiguous()), "qzeros": self._pack(zero.t().round().to(torch.uint8)),
                "scales": scale.t().to(scale_dtype).contiguous()}
