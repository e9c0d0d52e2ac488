"""The built-in weight-only quantizer (`WeightOnlyConfig`): int8 per-channel or int4 group-wise Linears, quantized
as each weight streams in.

Saving writes compressed-tensors `pack-quantized` (int8 per channel; int4 per group or channel, symmetric or with
integer zero points), which the reference and vLLM-style loaders read. Two cases keep loom's own layout
(quant_method "loom_weight_only"), which loom keeps loading: asymmetric int4 loaded from a loom file written before
zero points became integers (its fractional zero points have no compressed-tensors form), and models whose
checkpoints store transposed weights (GPT-2's Conv1D): compressed-tensors quantizes only nn.Linear, and its groups
and channels run along the stored weight's last dimension, which for a Conv1D is the output, not the input.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.kernels.memory import gather_small_buffers, release_freed_memory
from loom.kernels import is_plain_linear
from loom.quantization import ct_layout
from loom.quantization.base import Quantizer, default_skips
from loom.quantization.config import WeightOnlyConfig
from loom.quantization.ct_config import CompressedTensorsConfig, weight_only_dict
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
            try:
                q, scale, *zero = module.quantize(weight)
            except ValueError as err:  # a group int4 cannot store (NaN, inf, too wide): say which tensor
                raise ValueError(f"{name}: {err}") from None
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
        modules = [model.get_submodule(name) for name in self.converted]
        for module in modules:
            module.choose_kernel()
        # the small weights into one huge-page buffer first (as the loader would after the hooks): a packed copy
        # made before would be remade at the first forward, its weight having moved
        gather_small_buffers(model)
        for module in modules:
            if module.kernel == "fbgemm_int8":
                module.packed_weight()  # pack now: the model is at its final size before the first forward
        release_freed_memory()


    # -- saving --------------------------------------------------------------------------------------------------
    def _saves_compressed_tensors(self, model: nn.Module) -> bool:
        if getattr(type(model), "_transposed_checkpoint_weights", ()):
            return False
        zeros = (getattr(model.get_submodule(n), "zero_point", None) for n in self.converted)
        return all(z is None or torch.equal(z, z.round()) for z in zeros)

    def checkpoint_tensors(self, model, tensors):
        if not self._saves_compressed_tensors(model):
            return tensors
        return ct_layout.to_compressed_tensors(model, self.converted, tensors, {})

    def saved_config(self, model: nn.Module):
        if not self._saves_compressed_tensors(model):
            return self.config
        channel = self.config.bits == 8 or self.config.group_size == -1
        weights = {"dynamic": False, "group_size": None if channel else self.config.group_size,
                   "num_bits": self.config.bits, "strategy": "channel" if channel else "group",
                   "symmetric": self.config.symmetric,
                   "type": "int"}
        ignore = [n for n, m in model.named_modules() if is_plain_linear(m) and n not in self._converted_set()]
        return CompressedTensorsConfig.from_dict(weight_only_dict(weights, ignore))
