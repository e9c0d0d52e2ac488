"""Loading (and saving back) compressed-tensors checkpoints without the compressed-tensors package.

Layouts that loom's kernels run are repacked at load, bit-exact: int8 symmetric per channel (or per tensor) into
`Int8Linear`, int8 symmetric per group (16-512 inputs) into `Int8GroupLinear`, int4 per group / channel / tensor,
symmetric or with integer zero points, into `Int4Linear` (float32 scales and zero points, so nothing is rounded;
float16 when that holds them exactly, as for loom's own asymmetric int4 saves and GGUF Q8_0 saves). Everything else
(other bit widths, int8 with zero points, act-order `weight_g_idx`, FP8 `float-quantized`, block scales) is
dequantized at load by the format's definition, w = (q - zero_point) * scale computed in the scale's dtype as
compressed-tensors does, into a plain float Linear; `from_pretrained(dtype=...)` then casts it like any other
weight. Such a model runs but cannot be saved back (the integers are gone); one whose quantized layers all run on
the kernels saves in its own layout.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.kernels import is_plain_linear, policy
from loom.quantization import ct_layout, kernels
from loom.quantization.base import replace_module
from loom.quantization.ct_config import CompressedTensorsConfig, WeightScheme
from loom.quantization.linear import Int4Linear, Int8GroupLinear, Int8Linear
from loom.quantization.prequantized import CollectingQuantizer, mismatch

CT_TENSORS = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx")


def kernel_for(scheme: WeightScheme, in_features: int) -> str | None:
    """'int8', 'int8_group' or 'int4' when loom's kernels run this scheme exactly, else None (dequantized)."""
    if scheme.type != "int" or scheme.act_order or scheme.strategy not in ("tensor", "channel", "group"):
        return None
    if scheme.num_bits == 8 and scheme.symmetric and scheme.strategy != "group":
        return "int8"
    if scheme.num_bits == 8 and scheme.symmetric:
        group = scheme.group_size
        if group % 16 == 0 and group <= policy.INT8_GROUP_MAX and in_features % group == 0:
            return "int8_group"
        return None
    group = scheme.group_size if scheme.strategy == "group" else in_features
    if scheme.num_bits == 4 and in_features % 2 == 0 and in_features % group == 0 and group % 2 == 0:
        return "int4"
    return None


def zero_point_is_packed(scheme: WeightScheme) -> bool:
    return scheme.packed and scheme.strategy in ("group", "channel")


def required_tensors(scheme: WeightScheme) -> tuple[str, ...]:
    names = ("weight_packed", "weight_shape", "weight_scale") if scheme.packed else ("weight", "weight_scale")
    if not scheme.symmetric and scheme.type == "int":
        names += ("weight_zero_point",)
    if scheme.act_order:
        names += ("weight_g_idx",)
    return names


class CompressedTensorsQuantizer(CollectingQuantizer):
    method = "compressed-tensors"
    format_name = "compressed-tensors"
    tensor_names = CT_TENSORS
    config: CompressedTensorsConfig

    def __init__(self, config, pre_quantized: bool) -> None:
        super().__init__(config, pre_quantized)
        self.schemes: dict[str, WeightScheme] = {}
        self._scale_dtypes: dict[str, torch.dtype] = {}

    # -- targeting -----------------------------------------------------------------------------------------------
    def targets(self, model: nn.Module) -> list[str]:
        # the reference's GPT-2 uses Conv1D (stored transposed), which a target "Linear" does not match
        transposed = getattr(type(model), "_transposed_checkpoint_weights", ())
        for name, module in model.named_modules():
            if not is_plain_linear(module):
                continue
            classes = () if any(f"{name}.weight".endswith(s) for s in transposed) else \
                tuple(c.__name__ for c in type(module).__mro__)
            scheme = self.config.scheme_for(name, classes)
            if scheme is not None:
                self.schemes[name] = scheme
        return list(self.schemes)

    def prepare_model(self, model: nn.Module) -> None:
        self.converted = self.targets(model)
        for name in self.converted:
            linear = model.get_submodule(name)
            kernel = kernel_for(self.schemes[name], linear.in_features)
            bias = linear.bias is not None
            if kernel == "int8":
                replace_module(model, name, Int8Linear(linear.in_features, linear.out_features, bias, device="meta"))
            elif kernel == "int8_group":
                replace_module(model, name, Int8GroupLinear(linear.in_features, linear.out_features, bias,
                                                            self.schemes[name].group_size, torch.float32,
                                                            device="meta"))
            elif kernel == "int4":
                scheme = self.schemes[name]
                group = scheme.group_size if scheme.strategy == "group" else linear.in_features
                replace_module(model, name, Int4Linear(linear.in_features, linear.out_features, bias, group,
                                                       scheme.symmetric, device="meta"))
            else:
                self.dequantized.append(name)
        self._attach(model)
        model._transposed_checkpoint_weights = self._transposed

    # -- loader hook ---------------------------------------------------------------------------------------------
    def required(self, module: str) -> tuple[str, ...]:
        return required_tensors(self.schemes[module])

    def assemble(self, model, name: str, t: dict[str, torch.Tensor]) -> None:
        scheme = self.schemes[name]
        module = model.get_submodule(name)
        out, inp = module.out_features, module.in_features
        q = self._integers(name, scheme, t, out, inp)
        scale = t["weight_scale"]
        self._scale_dtypes[name] = scale.dtype
        if isinstance(module, Int8GroupLinear):
            module.weight = q.to(torch.int8)
            scale = self._expanded(name, scheme, scale, out, inp, (out, inp // module.group_size)).float()
            # float16 where that holds the scales exactly (GGUF Q8_0 saves): two bytes less per group
            module.weight_scale = (scale.half() if torch.equal(scale.half().float(), scale) else scale).contiguous()
        elif isinstance(module, Int8Linear):
            module.weight = q.to(torch.int8)
            module.weight_scale = self._expanded(name, scheme, scale, out, inp, (out, 1)).float().reshape(out).clone()
        elif isinstance(module, Int4Linear):
            groups = (out, inp // module.group_size)
            zero = None
            if module.asymmetric:
                zero = (self._zero_point(name, scheme, t, out, inp).float() + 8)
                zero = self._expanded(name, scheme, zero, out, inp, groups).contiguous()
            scale = self._expanded(name, scheme, scale, out, inp, groups).float().contiguous()
            if zero is not None and torch.equal(scale.half().float(), scale):
                scale, zero = scale.half(), zero.half()  # loom's own asymmetric layout, half the bytes, still exact
            module.set_quantized(kernels.pack_int4(q + 8), scale, zero)
        else:
            module.weight = nn.Parameter(self._dequantize(name, scheme, t, q, out, inp), requires_grad=False)

    def _integers(self, name, scheme, t, out, inp) -> torch.Tensor:
        if scheme.type == "float":
            return t["weight"]
        if scheme.packed:
            shape = tuple(int(v) for v in t["weight_shape"].tolist())
            if shape != (out, inp):
                raise mismatch(f"{name}.weight_shape", f"holds {shape}, the model's Linear is ({out}, {inp})")
            return ct_layout.unpack_signed(t["weight_packed"], scheme.num_bits, inp, f"{name}.weight_packed")
        q = t["weight"]
        if tuple(q.shape) != (out, inp) or q.dtype != torch.int8:
            raise mismatch(f"{name}.weight", f"holds {q.dtype} {tuple(q.shape)}, expected int8 ({out}, {inp})")
        return q.to(torch.int16)

    def _zero_point(self, name, scheme, t, out, inp) -> torch.Tensor:
        zp = t["weight_zero_point"]
        if zero_point_is_packed(scheme):
            return ct_layout.unpack_zero_point(zp, scheme.num_bits, out, f"{name}.weight_zero_point")
        return zp

    def _expanded(self, name, scheme, t, out, inp, want) -> torch.Tensor:
        """A per-tensor/channel/group scale or zero point as the (rows, groups) tensor loom's modules hold."""
        expected = {"tensor": (1,), "channel": (out, 1), "group": (out, -(-inp // (scheme.group_size or 1)))}
        shape = expected.get(scheme.strategy)
        if shape is not None and t.numel() != torch.Size(shape).numel():
            raise mismatch(name, f"a {scheme.strategy} scale or zero point has shape {tuple(t.shape)}, "
                           f"expected {shape}")
        return t.reshape(-1, 1).expand(want) if scheme.strategy == "tensor" else t.reshape(want)

    def _dequantize(self, name, scheme, t, q, out, inp) -> torch.Tensor:
        scale = t["weight_scale"]
        g_idx = t.get("weight_g_idx")
        if g_idx is not None and (tuple(g_idx.shape) != (inp,) or int(g_idx.max()) >= scale.shape[-1]):
            raise mismatch(f"{name}.weight_g_idx", f"holds {tuple(g_idx.shape)} group indices up to "
                           f"{int(g_idx.max())} for {inp} inputs and {scale.shape[-1]} groups")
        if scheme.strategy == "group" and g_idx is None and scale.shape[-1] * scheme.group_size < inp:
            raise mismatch(f"{name}.weight_scale", f"{scale.shape[-1]} groups of {scheme.group_size} do not cover "
                           f"{inp} inputs")
        w = q.to(scale.dtype)

        def expand(v):
            return ct_layout.expand_per_input(v, out, inp, scheme.strategy, scheme.group_size, scheme.block, g_idx)

        if "weight_zero_point" in t:
            w = w - expand(self._zero_point(name, scheme, t, out, inp).to(scale.dtype))
        return (w * expand(scale)).contiguous()

    # -- saving --------------------------------------------------------------------------------------------------
    def not_saved(self) -> list[str]:
        return [n for n in self.converted if n in self.dequantized or not (
            self.schemes[n].packed and self.schemes[n].strategy in ("group", "channel"))]

    def checkpoint_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return ct_layout.to_compressed_tensors(model, self.converted, tensors, self._scale_dtypes)

