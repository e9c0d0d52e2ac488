"""The Trainer on CUDA: bf16 autocast, fp16 with a gradient scaler, checkpoints with CUDA RNG state."""
from __future__ import annotations

import math

import pytest
import torch

from loom.training import Trainer
from tests.training.conftest import PadCollator, lm_rows, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(args_for, precision):
    args = args_for(max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3, **{precision: True})
    trainer = Trainer(tiny_llama(), args, train_dataset=lm_rows(48), data_collator=PadCollator())
    assert trainer.model.device.type == "cuda"
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (trainer.scaler is not None) == (precision == "fp16")


def test_resume_on_cuda_replays_the_run(args_for):
    args = args_for(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=4)
    full = Trainer(tiny_llama(), args, train_dataset=lm_rows(16), data_collator=PadCollator())
    full.train()
    resumed = Trainer(tiny_llama(), args, train_dataset=lm_rows(16), data_collator=PadCollator())
    resumed.train(resume_from_checkpoint=f"{args.output_dir}/checkpoint-3")
    a = [h["loss"] for h in full.state.log_history if "loss" in h]
    b = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert b == pytest.approx(a, rel=1e-4)  # GPU kernels (embedding backward) need not be bit-deterministic
