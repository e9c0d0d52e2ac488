"""The built-in weight-only quantizer (`WeightOnlyConfig`): int8 per-channel or int4 group-wise Linears, quantized
as each weight streams in, saved and reloaded as stored (quant_method "loom_weight_only")."""
from __future__ import annotations

from torch import nn

from loom.kernels.memory import release_freed_memory
from loom.quantization.base import Quantizer, default_skips
from loom.quantization.config import WeightOnlyConfig
from loom.quantization.linear import Int4Linear, Int8Linear, quantize_int8

_QUANT_TENSORS = ("weight", "weight_scale", "weight_zero")


class WeightOnlyQuantizer(Quantizer):
    method = "loom_weight_only"
    config: WeightOnlyConfig

    def modules_to_not_convert(self, model: nn.Module) -> list[str]:
        skip = list(self.config.modules_to_not_convert or [])
        if self.config.skip_output_embeddings:
            skip += default_skips(model)
        else:
            # a tied head shares the embedding matrix, which must stay float for the lookup
            for target, source in getattr(model, "_tied_weights_keys", {}).items():
                if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                    skip += [target.removesuffix(".weight"), source.removesuffix(".weight")]
        return skip

    def make_module(self, linear: nn.Linear) -> nn.Module:
        dtype = linear.weight.dtype
        bias = linear.bias is not None
        if self.config.bits == 8:
            return Int8Linear(linear.in_features, linear.out_features, bias, device="meta", dtype=dtype)
        return Int4Linear(linear.in_features, linear.out_features, bias, self.config.group_size,
                          self.config.symmetric, device="meta", dtype=dtype)

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        if self.config.bits == 8:
            return Int8Linear.from_linear(linear)
        return Int4Linear.from_linear(linear, self.config.group_size, self.config.symmetric)

    def load_tensor(self, model, name, source, dtype, device):
        module_name, _, attr = name.rpartition(".")
        if module_name not in self._converted_set() or attr not in _QUANT_TENSORS:
            return None
        module = model.get_submodule(module_name)
        if attr != "weight" or self.pre_quantized:
            return self._stored(module, name, attr, source, device)
        want = (module.out_features, module.in_features)
        if tuple(source.shape) != want:
            raise ValueError(f"{name}: the checkpoint holds shape {tuple(source.shape)}, the model expects {want}")
        weight = source.get().to(device)
        if self.config.bits == 8:
            q, scale = quantize_int8(weight)
        else:
            q, scale, *zero = module.quantize(weight)
            if zero:
                module._buffers["weight_zero"] = zero[0]
        module._buffers["weight_scale"] = scale
        return q

    def _stored(self, module, name, attr, source, device):
        expected = module._buffers[attr]
        if tuple(source.shape) != tuple(expected.shape) or source.dtype != expected.dtype:
            raise ValueError(f"{name}: the checkpoint holds {source.dtype} {tuple(source.shape)}, but "
                             f"{self.config!r} expects {expected.dtype} {tuple(expected.shape)}; the checkpoint's "
                             "quantization_config does not match its weights")
        return source.get().to(device)

    def accepts_shape_change(self, name: str) -> bool:
        # int4 weights are (out, in/2) bytes; full-precision checkpoints hold (out, in)
        module, _, attr = name.rpartition(".")
        return self.owns(name) or (attr in _QUANT_TENSORS and module in self._converted_set())

    def finish(self, model: nn.Module) -> None:
        super().finish(model)
        for name in self.converted:
            module = model.get_submodule(name)
            module.choose_kernel()
            if module.kernel == "fbgemm_int8":
                module.packed_weight()  # pack now: the model is at its final size before the first forward
        release_freed_memory()

