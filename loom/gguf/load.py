"""The GGUF format's load hook, behind `from_pretrained(path, gguf_file=name)`: the checkpoint is that one file, the
dtype float32 unless asked otherwise (as in the reference, which expands every GGUF to float32), and Q4_0 and Q8_0
Linear weights stay quantized, with the file's values exactly:
- Q4_0 (blocks of 32 values, one float16 scale, value = (nibble - 8) * scale) is loom's symmetric group-wise int4
  with group_size=32 and the scale widened to float32: `Int4Linear` on loom's int4 kernels;
- Q8_0 (blocks of 32 int8 values q, one float16 scale d, value = q * d) is loom's group-wise int8 with
  group_size=32 and the float16 scales as stored: `Int8GroupLinear` on loom::int8_group_linear.

Every other quantized type, and Q4_0/Q8_0 tensors that are not Linear weights (token embeddings), is expanded to
float, and the load says so once. Saving writes compressed-tensors `pack-quantized` (int4 and int8 symmetric, group
32, float32 scales: the file's values exactly), which loom and other tools reload.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from loom.gguf.reader import find_gguf
from loom.kernels import is_plain_linear
from loom.gguf.tensors import GgufCheckpoint, q4_0_nibbles, q8_0_values
from loom.loading import CheckpointFiles
from loom.quantization.base import target_linears
from loom.quantization.config import WeightOnlyConfig
from loom.quantization.ct_config import CompressedTensorsConfig, weight_only_dict
from loom.quantization.kernels import pack_int4
from loom.quantization.linear import Int8GroupLinear
from loom.quantization.weight_only import WeightOnlyQuantizer

logger = logging.getLogger("loom")
_FLOAT_TYPES = ("F32", "F16", "BF16")
_KEPT = {"Q4_0": 4, "Q8_0": 8}  # types whose Linear weights stay quantized -> bits
_GROUP = 32  # values per Q4_0 / Q8_0 block


class GgufLoadHook(WeightOnlyQuantizer):
    """The load hook of one GGUF file: its tensors under loom's names, its Q4_0 Linear weights as symmetric int4
    `Int4Linear`s and its Q8_0 Linear weights as `Int8GroupLinear`s (group 32)."""

    @classmethod
    def for_load(cls, request) -> "GgufLoadHook | None":
        if request.gguf_file is None:
            return None
        if request.quantization_config is not None:
            raise ValueError(f"gguf_file={str(request.gguf_file)!r} is already quantized by llama.cpp; loom loads it "
                             "as stored (Q4_0 and Q8_0 stay quantized, other types are expanded) and cannot quantize "
                             "it again. Drop quantization_config=, or load the original checkpoint to quantize it "
                             "with loom")
        return cls(find_gguf(request.path, request.gguf_file, **request.hub))

    def checkpoint_files(self, request) -> CheckpointFiles:
        return CheckpointFiles([self.file], safetensors=False)

    def configure(self, config, dtype: torch.dtype | None) -> torch.dtype:
        return torch.float32 if dtype is None else dtype

    def __init__(self, file: Path) -> None:
        super().__init__(WeightOnlyConfig(bits=4, group_size=32, symmetric=True, skip_output_embeddings=False),
                         pre_quantized=True)
        self.file = file
        handle = GgufCheckpoint(file)
        self.types = {name: handle.type_name(name) for name in handle.keys()}

    def targets(self, model: nn.Module) -> list[str]:
        linears = target_linears(model, [])
        kept = [n for n in linears if self.types.get(f"{n}.weight") in _KEPT]
        # the saved config names the rest, so a reload quantizes exactly these modules
        self.config.modules_to_not_convert = [n for n in linears if n not in kept]
        self._bits = {n: _KEPT[self.types[f"{n}.weight"]] for n in kept}
        self._bits_of_module = {id(model.get_submodule(n)): bits for n, bits in self._bits.items()}
        return kept

    def make_module(self, linear: nn.Linear) -> nn.Module:
        if self._bits_of_module[id(linear)] == 4:
            return super().make_module(linear)
        return Int8GroupLinear(linear.in_features, linear.out_features, linear.bias is not None, _GROUP,
                               torch.float16, device="meta", dtype=linear.weight.dtype)

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)
        owned = {f"{n}.weight" for n in self.converted}
        expanded = Counter(kind for name, kind in self.types.items() if kind not in _FLOAT_TYPES and name not in owned)
        if expanded:
            listed = ", ".join(f"{n} {kind}" for kind, n in sorted(expanded.items()))
            kept = Counter(self._bits.values())
            logger.warning(f"{self.file}: {listed} tensors are dequantized to the model's dtype (the file's values, "
                           "more memory): loom's kernels run only Q4_0 and Q8_0 Linear weights as they are stored "
                           f"({kept[4]} kept 4-bit, {kept[8]} kept 8-bit)")

    def _attach(self, model: nn.Module) -> None:
        if self.converted:  # nothing kept quantized: the model is a plain float model
            super()._attach(model)
            if 8 in self._bits.values() and getattr(model, "config", None) is not None:
                # the config the model saves with (and reloads as), not the int4 template this hook starts from
                model.config.quantization_config = self.saved_config(model)

    def load_tensor(self, model, name, source, dtype, device):
        module_name, _, attr = name.rpartition(".")
        if attr != "weight" or module_name not in self._converted_set():
            return None
        module = model.get_submodule(module_name)
        blocks = source.handle.raw_blocks(source.key)
        if self._bits[module_name] == 8:
            values, scale = q8_0_values(blocks)  # (out, groups, 32) int8, (out, groups) float16
            module._buffers["weight_scale"] = scale.to(device)
            return values.reshape(module.out_features, module.in_features).to(device)
        nibbles, scale = q4_0_nibbles(blocks)  # (out, groups, 32), (out, groups, 1)
        module._buffers["weight_scale"] = scale.squeeze(-1).to(device)
        return pack_int4(nibbles.reshape(module.out_features, module.in_features)).to(device)

    # -- saving: compressed-tensors, one scheme per kept type --------------------------------------------------------
    def saved_config(self, model: nn.Module):
        kinds = sorted(set(self._bits.values()))
        if kinds == [4]:  # WeightOnlyQuantizer's: int4 group 32 symmetric over every kept Linear
            return super().saved_config(model)
        if kinds == [8]:
            return self._ct_config(model, {8: ["Linear"]})
        # both types: each config group names its modules
        return self._ct_config(model, {bits: [n for n, b in self._bits.items() if b == bits] for bits in kinds})

    def _ct_config(self, model: nn.Module, targets: dict[int, list[str]]) -> CompressedTensorsConfig:
        ignore = [n for n, m in model.named_modules() if is_plain_linear(m) and n not in self._converted_set()]
        raw = weight_only_dict(None, ignore)
        template = raw["config_groups"].pop("group_0")
        for i, (bits, names) in enumerate(sorted(targets.items())):
            weights = {"dynamic": False, "group_size": _GROUP, "num_bits": bits, "strategy": "group",
                       "symmetric": True, "type": "int"}
            raw["config_groups"][f"group_{i}"] = {**template, "targets": names, "weights": weights}
        return CompressedTensorsConfig.from_dict(raw)
