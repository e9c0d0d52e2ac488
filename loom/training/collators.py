"""Data collators: turn a list of examples into a batch of tensors (padding with the tokenizer where needed)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

_LABEL_ALIASES = ("label", "label_ids")


def _as_dict(feature) -> dict:
    if isinstance(feature, Mapping):
        return dict(feature)
    if hasattr(feature, "__dict__"):
        return dict(vars(feature))
    raise TypeError(f"a collator needs examples that are dicts of fields, got {type(feature).__name__}")


def _rename_label(batch: dict, features: list[dict]) -> None:
    """The reference's convention: a 'label' or 'label_ids' field becomes the model's 'labels' argument."""
    for alias in _LABEL_ALIASES:
        if alias in features[0] and "labels" not in features[0]:
            values = [f[alias] for f in features]
            first = values[0].item() if torch.is_tensor(values[0]) and values[0].dim() == 0 else values[0]
            dtype = torch.long if isinstance(first, int) else torch.float if isinstance(first, float) else None
            batch["labels"] = torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values, dtype=dtype)
            batch.pop(alias, None)


def default_data_collator(features: list, return_tensors: str = "pt") -> dict[str, Any]:
    """Stack equally shaped fields into tensors; 'label'/'label_ids' become 'labels'; strings and None are dropped."""
    if return_tensors != "pt":
        raise ValueError(f"loom's collators return PyTorch tensors only (return_tensors='pt'), got {return_tensors!r}")
    features = [_as_dict(f) for f in features]
    if not features:
        raise ValueError("default_data_collator got an empty list of examples")
    batch: dict[str, Any] = {}
    _rename_label(batch, features)
    for key, first in features[0].items():
        if key in _LABEL_ALIASES and "labels" in batch or first is None or isinstance(first, str):
            continue
        values = [f[key] for f in features]
        try:
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"default_data_collator cannot stack field {key!r} ({e}); pad the examples to one length "
                             "first or use DataCollatorWithPadding") from None
    return batch


@dataclass
class DataCollatorWithPadding:
    """Pad token fields to the longest example (or max_length) with `tokenizer.pad`."""

    tokenizer: Any
    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __call__(self, features: list) -> dict[str, Any]:
        features = [_as_dict(f) for f in features]
        batch = dict(self.tokenizer.pad(features, padding=self.padding, max_length=self.max_length,
                                        pad_to_multiple_of=self.pad_to_multiple_of, return_tensors=self.return_tensors))
        for alias in _LABEL_ALIASES:
            if alias in batch:
                batch["labels"] = batch.pop(alias)
        return batch


def _pad_ids(examples: list, pad_id: int | None, pad_to_multiple_of: int | None, side: str = "right") -> torch.Tensor:
    """Stack lists of token ids, padding to the longest (and to a multiple) when their lengths differ."""
    rows = [torch.as_tensor(e, dtype=torch.long) for e in examples]
    length = max(r.shape[0] for r in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    if all(r.shape[0] == length for r in rows):
        return torch.stack(rows)
    if pad_id is None:
        raise ValueError("examples have different lengths and the tokenizer has no pad token; set "
                         "tokenizer.pad_token (e.g. to the eos token)")
    out = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            out[i, length - r.shape[0]:] = r
        else:
            out[i, : r.shape[0]] = r
    return out


@dataclass
class DataCollatorForLanguageModeling:
    """Batches for language modelling: causal (labels = inputs, padding ignored) or masked (the 80/10/10 rule).

    With mlm=True, mlm_probability of the non-special tokens become targets; of those, mask_replace_prob are replaced
    by the mask token, random_replace_prob by a random token, and the rest are left unchanged. Randomness comes from
    torch's global generator, so it is restored with the other RNG states when training resumes.
    """

    tokenizer: Any
    mlm: bool = True
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __post_init__(self) -> None:
        if self.mlm and getattr(self.tokenizer, "mask_token_id", None) is None:
            raise ValueError("mlm=True needs a tokenizer with a mask token; use mlm=False for causal language "
                             "modelling")
        if not 0 <= self.mlm_probability <= 1:
            raise ValueError(f"mlm_probability must lie in [0, 1], got {self.mlm_probability}")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError(f"mask_replace_prob + random_replace_prob must be <= 1, got {self.mask_replace_prob} + "
                             f"{self.random_replace_prob}")

    def __call__(self, examples: list) -> dict[str, Any]:
        if isinstance(examples[0], Mapping):
            batch = dict(self.tokenizer.pad([dict(e) for e in examples], return_tensors="pt",
                                            pad_to_multiple_of=self.pad_to_multiple_of))
        else:
            batch = {"input_ids": _pad_ids(examples, self.tokenizer.pad_token_id, self.pad_to_multiple_of,
                                           getattr(self.tokenizer, "padding_side", "right"))}
        special = batch.pop("special_tokens_mask", None)
        if self.mlm:
            batch["input_ids"], batch["labels"] = self.mask_tokens(batch["input_ids"], special)
        else:
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
            elif self.tokenizer.pad_token_id is not None:
                labels[labels == self.tokenizer.pad_token_id] = -100
            batch["labels"] = labels
        return batch

    def mask_tokens(self, inputs: torch.Tensor, special_tokens_mask: torch.Tensor | None = None):
        """(masked inputs, labels): labels are -100 except at the chosen target positions."""
        labels = inputs.clone()
        inputs = inputs.clone()
        if special_tokens_mask is None:
            special_tokens_mask = torch.tensor(
                [self.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                 for row in labels.tolist()], dtype=torch.bool)
        else:
            special_tokens_mask = special_tokens_mask.bool()
        probability = torch.full(labels.shape, self.mlm_probability)
        probability.masked_fill_(special_tokens_mask, 0.0)
        targets = torch.bernoulli(probability).bool()
        labels[~targets] = -100
        masked = torch.bernoulli(torch.full(labels.shape, self.mask_replace_prob)).bool() & targets
        inputs[masked] = self.tokenizer.mask_token_id
        # of the targets not masked, pick random_replace_prob / (1 - mask_replace_prob) to get random tokens
        rest = 1.0 - self.mask_replace_prob
        p_random = self.random_replace_prob / rest if rest > 0 else 0.0
        randomised = torch.bernoulli(torch.full(labels.shape, p_random)).bool() & targets & ~masked
        inputs[randomised] = torch.randint(len(self.tokenizer), labels.shape, dtype=torch.long)[randomised]
        return inputs, labels


@dataclass
class DataCollatorForTokenClassification:
    """Pad inputs with `tokenizer.pad` and per-token labels with label_pad_token_id (-100, ignored by the loss)."""

    tokenizer: Any
    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100
    return_tensors: str = "pt"

    def __call__(self, features: list) -> dict[str, Any]:
        features = [_as_dict(f) for f in features]
        key = "label" if "label" in features[0] else "labels"
        labels = [f[key] for f in features] if key in features[0] else None
        plain = [{k: v for k, v in f.items() if k != key} for f in features]
        batch = dict(self.tokenizer.pad(plain, padding=self.padding, max_length=self.max_length,
                                        pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"))
        if labels is None:
            return batch
        length = batch["input_ids"].shape[1]
        side = getattr(self.tokenizer, "padding_side", "right")
        out = torch.full((len(labels), length), self.label_pad_token_id, dtype=torch.long)
        for i, row in enumerate(labels):
            row = torch.as_tensor(row, dtype=torch.long)[:length]
            if side == "left":
                out[i, length - row.shape[0]:] = row
            else:
                out[i, : row.shape[0]] = row
        batch["labels"] = out
        return batch
