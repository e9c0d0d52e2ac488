"""Data collators: turn a list of examples into a batch of tensors (padding with the tokenizer where needed).

Every collator builds its batch with torch and returns PyTorch tensors (`return_tensors="pt"`) or NumPy arrays
(`"np"`, converted at the end, same values and dtypes). Examples are never modified.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_LABEL_ALIASES = ("label", "label_ids")
RETURN_TENSORS = ("pt", "np")


def check_return_tensors(return_tensors: str) -> str:
    return_tensors = getattr(return_tensors, "value", return_tensors)
    if return_tensors not in RETURN_TENSORS:
        raise ValueError(f"return_tensors must be 'pt' (PyTorch) or 'np' (NumPy), got {return_tensors!r}")
    return return_tensors


def as_framework(batch: dict, return_tensors: str) -> dict:
    """The batch with its tensors as `return_tensors` asks ("pt": unchanged, "np": NumPy arrays)."""
    if check_return_tensors(return_tensors) == "pt":
        return batch
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in batch.items()}


def _rows(values: list) -> list:
    """Copies of per-example fields as torch tensors (NumPy arrays and tensors are copied, never shared)."""
    return [torch.tensor(v) if not torch.is_tensor(v) else v.clone() for v in values]


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
            if values[0] is None:
                continue
            first = values[0].item() if torch.is_tensor(values[0]) and values[0].dim() == 0 else values[0]
            dtype = torch.long if isinstance(first, int) else torch.float if isinstance(first, float) else None
            batch["labels"] = torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values, dtype=dtype)


def default_data_collator(features: list, return_tensors: str = "pt") -> dict[str, Any]:
    """Stack equally shaped fields into tensors; 'label'/'label_ids' become 'labels'; strings and None are dropped."""
    check_return_tensors(return_tensors)
    features = [_as_dict(f) for f in features]
    if not features:
        raise ValueError("default_data_collator got an empty list of examples")
    batch: dict[str, Any] = {}
    if return_tensors == "np":
        _numpy_label(batch, features)
    else:
        _rename_label(batch, features)
    for key, first in features[0].items():
        if key in _LABEL_ALIASES or first is None or isinstance(first, str):
            continue
        values = [f[key] for f in features]
        try:
            if return_tensors == "np":  # NumPy's own dtype rules, as the reference (Python floats stay float64)
                batch[key] = np.stack([np.asarray(v) for v in values])
            else:
                batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"default_data_collator cannot stack field {key!r} ({e}); pad the examples to one length "
                             "first or use DataCollatorWithPadding") from None
    return batch


def _numpy_label(batch: dict, features: list[dict]) -> None:
    """The NumPy form of _rename_label, with the reference's NumPy dtypes (int64 for ints, else float32)."""
    for alias in _LABEL_ALIASES:
        first = features[0].get(alias)
        if first is None or "labels" in features[0]:
            continue
        values = [f[alias] for f in features]
        if isinstance(first, np.ndarray) and alias == "label_ids":
            batch["labels"] = np.stack(values)
        else:
            probe = first.item() if isinstance(first, np.ndarray) else first
            probe = probe[0] if alias == "label_ids" else probe
            batch["labels"] = np.array(values, dtype=np.int64 if isinstance(probe, (int, np.integer)) else np.float32)
        return


@dataclass
class DefaultDataCollator:
    """default_data_collator as an object, with its `return_tensors` fixed."""

    return_tensors: str = "pt"

    def __call__(self, features: list, return_tensors: str | None = None) -> dict[str, Any]:
        return default_data_collator(features, return_tensors or self.return_tensors)


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
        check_return_tensors(self.return_tensors)
        # a per-example 2-D+ attention mask (e.g. (1, q, kv)) is not padded: it is stacked as given
        masks = None
        mask = features[0].get("attention_mask")
        if mask is not None and getattr(mask, "ndim", 1) > 1:
            masks = torch.stack(_rows([f["attention_mask"] for f in features]))
            features = [{k: v for k, v in f.items() if k != "attention_mask"} for f in features]
        batch = dict(self.tokenizer.pad(features, padding=self.padding, max_length=self.max_length,
                                        pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt",
                                        return_attention_mask=False if masks is not None else None))
        if masks is not None:
            batch["attention_mask"] = masks
        for alias in _LABEL_ALIASES:
            if alias in batch:
                batch["labels"] = batch.pop(alias)
        return as_framework(batch, self.return_tensors)


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
    seed: int | None = None

    def __post_init__(self) -> None:
        check_return_tensors(self.return_tensors)
        self._generator, self._worker = None, None
        if self.mlm and getattr(self.tokenizer, "mask_token_id", None) is None:
            raise ValueError("mlm=True needs a tokenizer with a mask token; use mlm=False for causal language "
                             "modelling")
        if not 0 <= self.mlm_probability <= 1:
            raise ValueError(f"mlm_probability must lie in [0, 1], got {self.mlm_probability}")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError(f"mask_replace_prob + random_replace_prob must be <= 1, got {self.mask_replace_prob} + "
                             f"{self.random_replace_prob}")

    @property
    def generator(self) -> torch.Generator | None:
        """With `seed`, the collator's own generator: seeded `seed + worker id` in each DataLoader worker so the
        workers draw different masks and a rerun draws the same ones; without it, torch's global generator."""
        if self.seed is None:
            return None
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else None
        if self._generator is None or worker != self._worker:
            self._generator = torch.Generator().manual_seed(self.seed + (worker or 0))
            self._worker = worker
        return self._generator

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
        return as_framework(batch, self.return_tensors)

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
        generator = self.generator
        targets = torch.bernoulli(probability, generator=generator).bool()
        labels[~targets] = -100
        masked = torch.bernoulli(torch.full(labels.shape, self.mask_replace_prob), generator=generator).bool() & targets
        inputs[masked] = self.tokenizer.mask_token_id
        # of the targets not masked, pick random_replace_prob / (1 - mask_replace_prob) to get random tokens
        rest = 1.0 - self.mask_replace_prob
        p_random = self.random_replace_prob / rest if rest > 0 else 0.0
        randomised = torch.bernoulli(torch.full(labels.shape, p_random), generator=generator).bool() & targets & ~masked
        random_ids = torch.randint(len(self.tokenizer), labels.shape, dtype=torch.long, generator=generator)
        inputs[randomised] = random_ids[randomised]
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
        if labels is not None:
            batch["labels"] = pad_labels(labels, batch["input_ids"].shape[1], self.label_pad_token_id,
                                         getattr(self.tokenizer, "padding_side", "right"))
        return as_framework(batch, self.return_tensors)


def pad_labels(labels: list, length: int, pad_id: int, side: str) -> torch.Tensor:
    """Per-token label rows padded (or cut) to `length` with `pad_id` on the tokenizer's padding side."""
    out = torch.full((len(labels), length), pad_id, dtype=torch.long)
    for i, row in enumerate(labels):
        row = torch.as_tensor(row, dtype=torch.long)[:length]
        if side == "left":
            out[i, length - row.shape[0]:] = row
        else:
            out[i, : row.shape[0]] = row
    return out
