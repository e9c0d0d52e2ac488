"""Datasets and data order for the Trainer: column filtering, a resumable shuffled sampler, batch checks."""
from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

LABEL_ALIASES = ("label", "label_ids", "labels")


class ListDataset(Dataset):
    """A list of dicts as a map-style dataset."""

    def __init__(self, rows: list) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def as_dataset(data, name: str):
    """Accept a torch Dataset, a list of dicts or a `datasets.Dataset` (which the Trainer prepares when loading)."""
    if data is None:
        return None
    if isinstance(data, (list, tuple)):
        if data and not isinstance(data[0], Mapping):
            raise TypeError(f"{name} is a list of {type(data[0]).__name__}; a list dataset must hold dicts of fields")
        return ListDataset(list(data))
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) and not isinstance(data, torch.utils.data.
                                                                                           IterableDataset):
        raise TypeError(f"{name} must be a torch Dataset, a list of dicts or a datasets.Dataset, got "
                        f"{type(data).__name__}")
    return data


def is_hf_dataset(data) -> bool:
    """Whether `data` is a `datasets.Dataset`; never imports datasets (whoever holds one has imported it)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(data, module.Dataset)


def prepare_hf_dataset(dataset, keep: set[str] | None, name: str):
    """A `datasets.Dataset` for the Trainer: the columns outside `keep` removed with the dataset's own
    remove_columns (None keeps all), and rows formatted as torch tensors (strings stay strings)."""
    if keep is not None:
        ignored = [c for c in dataset.column_names if c not in keep]
        if ignored and len(ignored) == len(dataset.column_names):
            raise ValueError(f"none of the {name} columns {dataset.column_names} is an argument of the model's forward "
                             f"(or a label field); rename them (e.g. to input_ids, labels) or set "
                             "remove_unused_columns=False and use a collator that builds the inputs")
        if ignored:
            dataset = dataset.remove_columns(ignored)
    fmt = dataset.format
    return dataset.with_format("torch", columns=fmt["columns"], output_all_columns=fmt["output_all_columns"])


def model_input_names(model: torch.nn.Module) -> set[str] | None:
    """Named parameters of the model's forward (a **kwargs catch-all is not a name), or None if unknowable. A peft
    wrapper forwards **kwargs to the model it wraps, so the wrapped model's forward names the inputs."""
    from loom.adapters import unwrap_peft

    try:
        params = inspect.signature(unwrap_peft(model).forward).parameters
    except (TypeError, ValueError):
        return None
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class RemoveColumnsCollator:
    """Drops the example fields the model cannot take before collating (keeping label fields)."""

    def __init__(self, collator: Callable, keep: set[str]) -> None:
        self.collator = collator
        self.keep = set(keep) | set(LABEL_ALIASES)

    def __call__(self, features: list) -> Any:
        features = [{k: v for k, v in f.items() if k in self.keep} if isinstance(f, Mapping) else f for f in features]
        return self.collator(features)


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation seeded by (seed, epoch), optionally starting `skip` indices in.

    The order depends only on the seed and epoch number, never on global RNG state, so a resumed run sees the same
    order as the uninterrupted one; skipping happens on indices, so no skipped example is loaded or collated.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        return iter(order[self.skip:].tolist())

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def check_batch(batch: Any, where: str) -> None:
    """A collated batch must be a mapping of tensors (lists or strings cannot go to the model)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"the data collator returned a {type(batch).__name__} for the {where} batch; it must return a "
                        "dict of tensors (field name -> tensor)")
    bad = {k: type(v).__name__ for k, v in batch.items() if not torch.is_tensor(v)}
    if bad:
        raise TypeError(f"the data collator returned non-tensor values for {bad} in the {where} batch; return tensors "
                        "(e.g. pad with DataCollatorWithPadding) or drop those fields")


def move_to(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
