"""Evaluation outputs: EvalPrediction, and an accumulator that keeps only what metrics need.

Predictions are moved to the CPU batch by batch (after `preprocess_logits_for_metrics`, which typically turns
(B, T, V) logits into (B, T) ids), so memory follows the reduced size; with `batch_eval_metrics=True` nothing is kept
at all and compute_metrics sees one batch at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch


@dataclass
class EvalPrediction:
    """What compute_metrics receives: predictions and label_ids as numpy arrays (or tuples of them)."""

    predictions: Any
    label_ids: Any
    inputs: Any = None
    losses: Any = None

    def __iter__(self):
        return iter((self.predictions, self.label_ids))

    def __getitem__(self, i: int):
        return (self.predictions, self.label_ids)[i]


class PredictionOutput(NamedTuple):
    predictions: Any
    label_ids: Any
    metrics: dict[str, float] | None


class EvalLoopOutput(NamedTuple):
    predictions: Any
    label_ids: Any
    metrics: dict[str, float] | None
    num_samples: int


def to_numpy(x):
    """Tensors (or nested tuples of them) -> numpy on the CPU; bfloat16 goes through float32."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(to_numpy(t) for t in x)
    if torch.is_tensor(x):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()
    return x


class _Buffer:
    """One growable array: rows appended along axis 0, the second axis padded with -100 to the widest batch.

    Copying each batch into one preallocated block (sized for the whole eval set when its length is known) keeps the
    retained memory in a single allocation, so the large per-batch logits freed in between are reused by the
    allocator instead of being fragmented by many small retained chunks.
    """

    def __init__(self, first: np.ndarray, capacity: int, padding_index: int = -100) -> None:
        self.pad = padding_index
        self.rows = 0
        self.data = np.full((max(capacity, first.shape[0]), *first.shape[1:]), padding_index, dtype=first.dtype)

    def add(self, x: np.ndarray) -> None:
        if x.ndim != self.data.ndim or x.shape[2:] != self.data.shape[2:]:
            raise ValueError(f"evaluation outputs change shape between batches ({self.data.shape[1:]} vs "
                             f"{x.shape[1:]}); only the second axis may vary")
        need_rows = self.rows + x.shape[0]
        width = max(self.data.shape[1], x.shape[1]) if x.ndim > 1 else None
        if need_rows > self.data.shape[0] or (width is not None and width > self.data.shape[1]):
            shape = (max(need_rows, 2 * self.data.shape[0]), *((width,) if width else ()), *self.data.shape[2:])
            grown = np.full(shape, self.pad, dtype=np.result_type(self.data, x))
            if x.ndim > 1:
                grown[: self.rows, : self.data.shape[1]] = self.data[: self.rows]
            else:
                grown[: self.rows] = self.data[: self.rows]
            self.data = grown
        if x.ndim > 1:
            self.data[self.rows: need_rows, : x.shape[1]] = x
        else:
            self.data[self.rows: need_rows] = x
        self.rows = need_rows

    def result(self) -> np.ndarray:
        return self.data[: self.rows]


class Accumulator:
    """Collects per-batch outputs of one kind (predictions or labels; arrays or tuples of arrays) on the CPU."""

    def __init__(self, expected_rows: int = 0) -> None:
        self.expected_rows = expected_rows
        self.buffers: list[_Buffer] | None = None
        self.is_tuple = False

    def add(self, x) -> None:
        if x is None:
            return
        parts = list(x) if isinstance(x, (tuple, list)) else [x]
        arrays = [np.asarray(to_numpy(p)) for p in parts]
        if self.buffers is None:
            self.is_tuple = isinstance(x, (tuple, list))
            self.buffers = [_Buffer(a, self.expected_rows) for a in arrays]
        for buf, a in zip(self.buffers, arrays):
            buf.add(a)

    def result(self):
        if self.buffers is None:
            return None
        out = [b.result() for b in self.buffers]
        return tuple(out) if self.is_tuple else out[0]

    def nbytes(self) -> int:
        return sum(b.data.nbytes for b in self.buffers or ())


class BatchList:
    """eval_do_concat_batches=False: each batch's outputs kept as they are (numpy), in a list, never joined."""

    def __init__(self, expected_rows: int = 0) -> None:
        self.items: list = []

    def add(self, x) -> None:
        if x is not None:
            self.items.append(to_numpy(tuple(x) if isinstance(x, list) else x))

    def result(self):
        return self.items or None


class LossMean:
    """The sample-weighted mean of batch losses; with skip_nonfinite (logging_nan_inf_filter) nan/inf batches are
    left out, and the mean is nan only when every batch was."""

    def __init__(self, skip_nonfinite: bool) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.total, self.count, self.skipped = 0.0, 0, False

    def add(self, loss, size: int) -> None:
        if loss is None:
            return
        value = float(loss)
        if self.skip_nonfinite and not np.isfinite(value):
            self.skipped = True
            return
        self.total += value * size
        self.count += size

    def result(self) -> float | None:
        if self.count:
            return self.total / self.count
        return float("nan") if self.skipped else None
