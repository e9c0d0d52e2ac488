"""The GGUF format's load hook, behind `from_pretrained(path, gguf_file=name)`: the checkpoint is that one file, the
dtype float32 unless asked otherwise (as in the reference, which expands every GGUF to float32), and Q4_0 Linear
weights stay quantized: Q4_0 (blocks of 32 values, one float16 scale, value = (nibble - 8) * scale) is exactly loom's
symmetric group-wise int4 with group_size=32 and the scale widened to float32, so those weights load into
`Int4Linear` and run on loom's int4 kernels with the same numbers as the file.

Every other quantized type is expanded to float (loom has no kernel with its layout: Q8_0's per-32 int8 blocks do
not fit the per-row int8 `Int8Linear`), and the load says so once. The model then carries a `WeightOnlyConfig`, so
`save_pretrained` writes a checkpoint loom reloads as it is.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from loom.gguf.reader import find_gguf
from loom.gguf.tensors import GgufCheckpoint, q4_0_nibbles
from loom.loading import CheckpointFiles
from loom.quantization.base import target_linears
from loom.quantization.config import WeightOnlyConfig
from loom.quantization.kernels import pack_int4
from loom.quantization.weight_only import WeightOnlyQuantizer

logger = logging.getLogger("loom")
_FLOAT_TYPES = ("F32", "F16", "BF16")


class GgufLoadHook(WeightOnlyQuantizer):
    """The load hook of one GGUF file: its tensors under loom's names, its Q4_0 Linear weights as symmetric int4
    `Int4Linear`s (group 32)."""

    @classmethod
    def for_load(cls, request) -> "GgufLoadHook | None":
        if request.gguf_file is None:
            return None
        if request.quantization_config is not None:
            raise ValueError(f"gguf_file={str(request.gguf_file)!r} is already quantized by llama.cpp; loom loads it "
                             "as stored (Q4_0 stays 4-bit, other types are expanded) and cannot quantize it again. "
                             "Drop quantization_config=, or load the original checkpoint to quantize it with loom")
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
        kept = [n for n in linears if self.types.get(f"{n}.weight") == "Q4_0"]
        # the saved config names the rest, so a reload quantizes exactly these modules
        self.config.modules_to_not_convert = [n for n in linears if n not in kept]
        return kept

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)
        owned = {f"{n}.weight" for n in self.converted}
        expanded = Counter(kind for name, kind in self.types.items() if kind not in _FLOAT_TYPES and name not in owned)
        if expanded:
            listed = ", ".join(f"{n} {kind}" for kind, n in sorted(expanded.items()))
            logger.warning(f"{self.file}: {listed} tensors are dequantized to the model's dtype (the file's values, "
                           "more memory): loom's kernels run only Q4_0 Linear weights as they are stored "
                           f"({len(owned)} kept 4-bit)")

    def _attach(self, model: nn.Module) -> None:
        if self.converted:  # nothing kept quantized: the model is a plain float model
            super()._attach(model)

    def load_tensor(self, model, name, source, dtype, device):
        module_name, _, attr = name.rpartition(".")
        if attr != "weight" or module_name not in self._converted_set():
            return None
        nibbles, scale = q4_0_nibbles(source.handle.q4_0_blocks(source.key))  # (out, groups, 32), (out, groups, 1)
        module = model.get_submodule(module_name)
        module._buffers["weight_scale"] = scale.squeeze(-1).to(device)
        return pack_int4(nibbles.reshape(module.out_features, module.in_features)).to(device)
