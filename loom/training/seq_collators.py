"""Collators for sequence-to-sequence batches (labels padded apart from the inputs) and for packed batches (all
examples concatenated into one row, positions restarting at each example)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loom.training.collators import _as_dict, as_framework, check_return_tensors, pad_labels


@dataclass
class DataCollatorForSeq2Seq:
    """Pad the inputs with `tokenizer.pad` and the labels, separately, with `label_pad_token_id` (-100, ignored by
    the loss). With a `model` that has `prepare_decoder_input_ids_from_labels`, also returns decoder_input_ids."""

    tokenizer: Any
    model: Any = None
    padding: Any = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100
    return_tensors: str = "pt"

    def __call__(self, features: list, return_tensors: str | None = None) -> dict[str, Any]:
        return_tensors = check_return_tensors(return_tensors or self.return_tensors)
        features = [_as_dict(f) for f in features]
        key = "label" if "label" in features[0] else "labels"
        labels = [f[key] for f in features] if features[0].get(key) is not None else None
        plain = [{k: v for k, v in f.items() if k not in ("label", "labels")} for f in features]
        batch = dict(self.tokenizer.pad(plain, padding=self.padding, max_length=self.max_length,
                                        pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"))
        if labels is not None:
            batch["labels"] = self._padded_labels(labels)
            prepare = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
            if prepare is not None and "decoder_input_ids" not in batch:
                batch["decoder_input_ids"] = prepare(labels=batch["labels"])
        return as_framework(batch, return_tensors)

    def _padded_labels(self, labels: list) -> torch.Tensor:
        lengths = [len(row) for row in labels]
        strategy = getattr(self.padding, "value", self.padding)
        if strategy in (False, None, "do_not_pad"):
            if len(set(lengths)) > 1:
                raise ValueError(f"labels have different lengths {sorted(set(lengths))} and padding is off; pad "
                                 "them (padding=True) or give equal-length examples")
            length = lengths[0]
        elif strategy == "max_length" and self.max_length is not None:
            length = self.max_length
        else:
            length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return pad_labels(labels, length, self.label_pad_token_id, getattr(self.tokenizer, "padding_side", "right"))


@dataclass
class DataCollatorWithFlattening:
    """Pack a batch into one row (1, total tokens), with no padding. Each example's positions restart at
    `position_ids_start`, so attention that reads sequence boundaries from position_ids keeps examples apart. Labels
    (given, or the input ids) get `separator_id` on each example's first token, so no example learns to predict
    across a boundary. Optionally returns FlashAttention's cu_seq_lens/max_length and per-token seq_idx (int32)."""

    return_tensors: str = "pt"
    return_position_ids: bool = True
    separator_id: int = -100
    return_flash_attn_kwargs: bool = False
    return_seq_idx: bool = False
    position_ids_start: int = 0

    def __call__(self, features: list, return_tensors: str | None = None,
                 separator_id: int | None = None) -> dict[str, Any]:
        return_tensors = check_return_tensors(return_tensors or self.return_tensors)
        separator = self.separator_id if separator_id is None else separator_id
        rows = [_ids(f["input_ids"]) for f in map(_as_dict, features) if len(f["input_ids"]) > 0]
        if not rows:
            raise ValueError("DataCollatorWithFlattening got a batch in which every example is empty")
        with_labels = "labels" in _as_dict(features[0])
        labels = [_ids(f["labels"]) for f in map(_as_dict, features) if len(f["input_ids"]) > 0] if with_labels \
            else rows
        batch = {"input_ids": torch.cat(rows)[None],
                 "labels": torch.cat([torch.cat([torch.tensor([separator]), r[1:]]) for r in labels])[None]}
        lengths = torch.tensor([len(r) for r in rows])
        if self.return_position_ids:
            batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths.tolist()])[None] + self.position_ids_start
        if self.return_seq_idx:
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(len(rows)), lengths)[None].int()
        if self.return_flash_attn_kwargs:
            boundaries = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = boundaries
            batch["max_length_q"] = batch["max_length_k"] = int(lengths.max())
        return as_framework(batch, return_tensors)


def _ids(values) -> torch.Tensor:
    return values.detach().clone().long().view(-1) if torch.is_tensor(values) else torch.tensor(values,
                                                                                                dtype=torch.long)
