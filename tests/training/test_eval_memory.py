"""Evaluation memory follows the batch, not the eval set, when preprocess_logits_for_metrics reduces the logits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from loom.training import Trainer

VOCAB, LENGTH, BATCH = 2048, 64, 8  # 4 MiB of float32 logits per batch


class WideLogits(nn.Module):
    """A stand-in language model whose only cost is its large (B, T, V) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(VOCAB))

    def forward(self, input_ids, labels=None):
        logits = self.bias.expand(*input_ids.shape, VOCAB) + input_ids[..., None].float()
        loss = logits.mean()
        return {"loss": loss, "logits": logits}


def _rows(n_batches: int) -> list[dict]:
    ids = torch.arange(LENGTH) % 7
    return [{"input_ids": ids, "labels": ids} for _ in range(n_batches * BATCH)]


def _peak_growth_mib(fn) -> float:
    """Peak resident memory reached while fn runs, above the resident memory before it (Linux /proc)."""
    status = Path("/proc/self/status")
    clear = Path("/proc/self/clear_refs")
    if not status.exists() or not clear.exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-memory counter")

    def read(field):
        line = next(x for x in status.read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) / 1024

    try:
        clear.write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak-memory counter (/proc/self/clear_refs not writable)")
    before = read("VmRSS")
    fn()
    return read("VmHWM") - before


def _trainer(args_for, reduce: bool) -> Trainer:
    return Trainer(WideLogits(), args_for(per_device_eval_batch_size=BATCH),
                   compute_metrics=lambda p: {"accuracy": float((p.predictions == p.label_ids).mean())},
                   preprocess_logits_for_metrics=(lambda logits, labels: logits.argmax(-1)) if reduce else None)


def test_eval_memory_does_not_grow_with_eval_set_size(args_for):
    trainer = _trainer(args_for, reduce=True)
    small, large = _rows(4), _rows(48)
    trainer.evaluate(small)  # warm up allocator and lazy initialisation
    grow_small = _peak_growth_mib(lambda: trainer.evaluate(small))
    grow_large = _peak_growth_mib(lambda: trainer.evaluate(large))
    full_logits_mib = 48 * BATCH * LENGTH * VOCAB * 4 / 2**20  # 192 MiB if every logit were kept
    assert grow_large - grow_small < 24, (grow_small, grow_large)
    assert grow_large < full_logits_mib / 4

    # the measurement can see retention: without the reduction every logit is kept for compute_metrics
    keeping = _trainer(args_for, reduce=False)
    keeping.compute_metrics = lambda p: {"n": float(p.predictions.shape[0])}
    assert _peak_growth_mib(lambda: keeping.evaluate(large)) > full_logits_mib / 2


def test_outputs_of_different_widths_are_padded_with_minus_100():
    import numpy as np

    from loom.training.evaluation import Accumulator

    acc = Accumulator(expected_rows=3)
    acc.add((torch.ones(2, 3), torch.zeros(2)))
    acc.add((torch.full((2, 5), 2.0), torch.ones(2)))  # wider, and more rows than expected
    wide, flat = acc.result()
    assert wide.shape == (4, 5) and flat.tolist() == [0, 0, 1, 1]
    assert np.array_equal(wide[:2, 3:], np.full((2, 2), -100.0)) and (wide[2:] == 2).all() and (wide[:2, :3] == 1).all()
