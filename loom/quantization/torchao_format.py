"""torchao checkpoints (`quant_method: "torchao"`, the reference's TorchAoConfig) read without torchao.

torchao's safetensors form flattens each quantized weight into its component tensors, named after the module:
Int8WeightOnlyConfig (symmetric int8 per output row, or per tensor) stores `<module>._weight_qdata` (int8, (out,
in)), `_weight_scale` ((out, 1) or (1, 1)) and `_weight_zero_point` (zeros); w = (qdata - zero_point) * scale.
That is exactly loom's `Int8Linear`, so those Linears load bit for bit and run on loom's int8 kernel. Other torchao
configs (int4 packings, float8, dynamic activation quantization, per-group int8) are refused by name. A loaded model
saves as compressed-tensors `pack-quantized` int8 per channel (what loom's WeightOnlyConfig(bits=8) writes), which the
reference and vLLM-style loaders read without torchao.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.quantization.base import default_skips, replace_module
from loom.quantization.config import WeightOnlyConfig
from loom.quantization.linear import Int8Linear
from loom.quantization.prequantized import CollectingQuantizer, mismatch
from loom.quantization.torchao_config import TORCHAO_METHOD, TorchAoConfig
from loom.quantization.weight_only import WeightOnlyQuantizer


class TorchAoQuantizer(CollectingQuantizer):
    """Builds loom's `Int8Linear`s from torchao's flattened Int8Tensor components."""

    method = TORCHAO_METHOD
    format_name = "torchao"
    tensor_names = ("_weight_qdata", "_weight_scale", "_weight_zero_point")
    config: TorchAoConfig

    def modules_to_not_convert(self, model: nn.Module) -> list[str]:
        return default_skips(model) + self.config.modules_to_not_convert  # the reference's rule for torchao

    def prepare_model(self, model: nn.Module) -> None:
        self.converted = self.targets(model)
        for name in self.converted:
            linear = model.get_submodule(name)
            replace_module(model, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                                   device="meta"))
        self._attach(model)

    def required(self, module: str) -> tuple[str, ...]:
        return ("_weight_qdata", "_weight_scale")

    def load_tensor(self, model, name, source, dtype, device):
        module, _, attr = name.rpartition(".")
        if attr == "weight" and module in self._converted_set():
            raise mismatch(name, f"a plain {source.dtype} weight where torchao's Int8WeightOnlyConfig stores "
                           f"{module}._weight_qdata and _weight_scale (list the layer in modules_to_not_convert if "
                           "it was left unquantized)")
        return super().load_tensor(model, name, source, dtype, device)

    def assemble(self, model, name: str, t: dict[str, torch.Tensor]) -> None:
        module = model.get_submodule(name)
        out, inp = module.out_features, module.in_features
        q, scale = t["_weight_qdata"], t["_weight_scale"]
        if q.dtype != torch.int8 or tuple(q.shape) != (out, inp):
            raise mismatch(f"{name}._weight_qdata", f"holds {q.dtype} {tuple(q.shape)}, expected int8 ({out}, {inp})")
        if scale.numel() not in (1, out):
            raise mismatch(f"{name}._weight_scale", f"holds {tuple(scale.shape)}, expected one scale per output row "
                           f"({out}, 1) or per tensor")
        module.weight = q
        module.weight_scale = scale.float().reshape(-1).expand(out).clone()

    def _collect(self, model, module: str, attr: str, source) -> None:
        if attr != "_weight_zero_point":
            return super()._collect(model, module, attr, source)
        if bool(source.get().ne(0).any()):  # zeros by the format: checked, not kept
            raise mismatch(f"{module}._weight_zero_point", "holds non-zero zero points; Int8WeightOnlyConfig is "
                           "symmetric, and loom's int8 kernel has none")

    # -- saving: compressed-tensors int8 per channel, as loom's WeightOnlyConfig(bits=8) writes -------------------
    def _saver(self) -> WeightOnlyQuantizer:
        saver = WeightOnlyQuantizer(WeightOnlyConfig(bits=8), pre_quantized=False)
        saver.converted = self.converted
        return saver

    def checkpoint_tensors(self, model, tensors):
        return self._saver().checkpoint_tensors(model, tensors)

    def saved_config(self, model):
        return self._saver().saved_config(model)
