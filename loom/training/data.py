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


# -- length-grouped order -------------------------------------------------------------------------------------------
def get_length_grouped_indices(lengths: list[int], batch_size: int, mega_batch_mult: int | None = None,
                               generator: torch.Generator | None = None) -> list[int]:
    """A shuffled order in which each run of `batch_size` indices has similar lengths (the reference's algorithm).

    A random permutation is cut into megabatches of `mega_batch_mult * batch_size` (by default up to 50 batches, at
    most a quarter of the data), each sorted longest first; the longest example of all is swapped to the very front
    so that an out-of-memory error shows on the first step rather than late in the epoch.
    """
    if mega_batch_mult is None:
        mega_batch_mult = max(1, min(len(lengths) // (batch_size * 4), 50))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = mega_batch_mult * batch_size
    megabatches = [sorted(order[i:i + size], key=lambda j: lengths[j], reverse=True)
                   for i in range(0, len(order), size)]
    if not megabatches:
        return []
    longest = max(range(len(megabatches)), key=lambda m: (lengths[megabatches[m][0]], -m))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


def lengths_of(dataset, model_input_name: str | None = None, length_column_name: str = "length") -> list[int]:
    """Example lengths: a `datasets.Dataset`'s length column when it has one, else len(example[model_input_name])."""
    if is_hf_dataset(dataset) and length_column_name in dataset.column_names:
        return [int(n) for n in dataset[length_column_name]]
    name = model_input_name or "input_ids"
    first = dataset[0] if len(dataset) else None
    if not isinstance(first, Mapping) or name not in first:
        raise ValueError(f"train_sampling_strategy='group_by_length' needs the length of each example: give the "
                         f"examples an {name!r} field, or a {length_column_name!r} column (length_column_name)")
    return [len(dataset[i][name]) for i in range(len(dataset))]


class LengthGroupedSampler(Sampler[int]):
    """Indices grouped so that batches hold examples of similar length, with some randomness (the reference's
    sampler and arguments: lengths are given or read from `dataset[i][model_input_name]`)."""

    def __init__(self, batch_size: int, dataset=None, lengths: list[int] | None = None,
                 model_input_name: str | None = None, generator: torch.Generator | None = None) -> None:
        if dataset is None and lengths is None:
            raise ValueError("LengthGroupedSampler needs a dataset or the lengths of its examples")
        self.batch_size = batch_size
        self.lengths = lengths.tolist() if torch.is_tensor(lengths) else \
            list(lengths) if lengths is not None else lengths_of(dataset, model_input_name)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator))


class LengthGroupedEpochSampler(EpochSampler):
    """The Trainer's group_by_length order: seeded by (seed, epoch) and skippable like EpochSampler, so runs resume
    exactly."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = lengths, batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g)[self.skip:])
