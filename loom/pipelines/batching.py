"""Batching for pipelines: group chunks of similar length, pad each batch only to its longest member, and split
the batched model outputs back into per-chunk outputs without the padding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# model inputs padded with 0 (input_ids use the tokenizer's pad id); anything else is stacked as is
_PADDED_WITH_ZERO = ("attention_mask", "token_type_ids", "special_tokens_mask", "position_ids")


@dataclass
class Chunk:
    """One forward-pass row: model inputs without a batch axis, plus what postprocess needs to know about it."""

    inputs: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None

    @property
    def length(self) -> int:
        ids = self.inputs.get("input_ids")
        return 0 if ids is None else len(ids)


def length_sorted_batches(chunks: list[Chunk], batch_size: int) -> list[list[int]]:
    """Indices of `chunks` in batches of at most batch_size, longest first, so each batch holds similar lengths."""
    if batch_size <= 1:
        return [[i] for i in range(len(chunks))]
    order = sorted(range(len(chunks)), key=lambda i: -chunks[i].length)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(chunks: list[Chunk], pad_id: int, pad_left: bool, device: torch.device) -> tuple[dict, int]:
    """Batched tensors on `device`, sequences padded to the longest in this batch; returns (batch, padded length)."""
    batch: dict[str, torch.Tensor] = {}
    longest = max(c.length for c in chunks)
    for key in chunks[0].inputs:
        values = [c.inputs[key] for c in chunks]
        if key == "input_ids" or key in _PADDED_WITH_ZERO:
            fill = pad_id if key == "input_ids" else 0
            array = np.full((len(values), longest), fill, dtype=np.int64)
            for row, value in enumerate(values):
                n = len(value)
                if n:
                    array[row, slice(longest - n, None) if pad_left else slice(0, n)] = value
            batch[key] = torch.from_numpy(array)
        else:
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
    if "input_ids" in batch and "attention_mask" not in batch and any(c.length != longest for c in chunks):
        mask = np.zeros((len(chunks), longest), dtype=np.int64)
        for row, c in enumerate(chunks):
            mask[row, slice(longest - c.length, None) if pad_left else slice(0, c.length)] = 1
        batch["attention_mask"] = torch.from_numpy(mask)
    return {k: v.to(device) for k, v in batch.items()}, longest


def split_outputs(outputs: dict[str, Any], chunks: list[Chunk], padded: int, per_token: tuple[str, ...],
                  pad_left: bool) -> None:
    """Store each chunk's row of the batched outputs in chunk.outputs, per-token outputs cut to its real length."""
    moved = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in outputs.items()}
    for row, chunk in enumerate(chunks):
        own = {}
        for key, value in moved.items():
            if not torch.is_tensor(value):
                own[key] = value[row] if isinstance(value, (list, tuple)) else value
                continue
            value = value[row]
            if key in per_token and chunk.length != padded:
                value = value[padded - chunk.length:] if pad_left else value[:chunk.length]
            own[key] = value
        chunk.outputs = own
