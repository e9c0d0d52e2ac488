"""What `from_pretrained(..., gguf_file=...)` needs beyond the config: the checkpoint files, the loader hook and the
dtype (float32 unless asked otherwise, as in the reference, which expands every GGUF to float32)."""
from __future__ import annotations

import torch

from loom.gguf.quant import GgufQ4Loader
from loom.gguf.reader import find_gguf
from loom.loading import CheckpointFiles


def gguf_checkpoint(path_or_id, gguf_file, dtype, quantization_config, hub_kwargs: dict):
    """(CheckpointFiles, loader hook, dtype) for a GGUF load."""
    if quantization_config is not None:
        raise ValueError(f"gguf_file={str(gguf_file)!r} is already quantized by llama.cpp; loom loads it as stored "
                         "(Q4_0 stays 4-bit, other types are expanded) and cannot quantize it again. Drop "
                         "quantization_config=, or load the original checkpoint to quantize it with loom")
    file = find_gguf(path_or_id, gguf_file, **hub_kwargs)
    return CheckpointFiles([file], safetensors=False), GgufQ4Loader(file), torch.float32 if dtype is None else dtype
