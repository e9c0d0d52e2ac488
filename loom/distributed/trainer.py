"""What makes loom's Trainer a ParallelTrainer (under torchrun, with tensor / context / FSDP2 data parallelism).

A mixin rather than a Trainer subclass: `Trainer(...)` itself returns a ParallelTrainer when the arguments ask for
parallelism, so the training package assembles the class (loom/training/trainer.py) and this file needs no Trainer.
It overrides only the Trainer's documented extension points (sampler, item counting, loss, gradient sync, clipping,
model wrapping, checkpoints), so the same script runs with `python train.py` (one process: every size is 1) and
with `torchrun --nproc_per_node N train.py`. Sizes come from `parallel=` or from the TrainingArguments fields
tp_size / cp_size / fsdp when they exist.

Checkpoints: checkpoint-N/ holds the gathered model.safetensors (loadable by from_pretrained in one process), the
trainer's usual state files, and dcp/ with the sharded model + optimizer state, which resumes at any world size (with
the same global batch: see CheckpointMixin._check_data_position) and in a single-process Trainer.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from loom.distributed.context import ParallelContext, _is_distributed, setup_parallel
from loom.training import checkpoints as ckpt


class ParallelTrainerMixin:
    """Put before Trainer in the bases: each method here wraps or replaces the Trainer's (see the module docstring)."""

    def __init__(self, *args, parallel: ParallelContext | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.parallel = parallel if parallel is not None else setup_parallel(self.args)
        if self.model_init is not None and self.parallel.enabled:
            raise ValueError("ParallelTrainer does not support model_init (hyper-parameter search); pass a model")
        # parallelise before the optimizer exists: FSDP and tensor parallel replace the parameters
        self.model = self.parallel.wrap_model(self.model)
        self.callback_handler.model = self._forward_model = self.model
        if self.optimizer is not None:
            raise ValueError("ParallelTrainer builds its optimizer after sharding the model; pass optimizers=(None, "
                             "scheduler) or override create_optimizer")

    # -- data and loss -------------------------------------------------------------------------------------------
    def _train_sampler(self, dataset):
        if self.args.train_sampling_strategy != "random":
            raise ValueError(f"train_sampling_strategy={self.args.train_sampling_strategy!r} is not supported by the "
                             "ParallelTrainer (tp_size / cp_size / fsdp or torchrun); use 'random'")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return self.parallel.sampler(dataset, shuffle=True, seed=seed, drop_last=self.args.dataloader_drop_last)

    def _parallel_sizes(self) -> tuple[int, int]:
        return self.parallel.world_size, self.parallel.dp_size

    def count_loss_items(self, batches: list[dict]):
        local = super().count_loss_items(batches)
        return None if local is None else self.parallel._sum(local, "dp")

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        if self.parallel.cp_size == 1 or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.parallel.compute_loss(model, self.parallel.prepare_batch(inputs), num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None,
                      num_micro_batches: int = 1) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch, num_micro_batches)
        return self.parallel.reduce_loss(loss)  # logged losses are global means, equal on every rank

    # -- gradients -----------------------------------------------------------------------------------------------
    def gradient_sync(self, is_last_micro_batch: bool):
        return self.parallel.gradient_sync(self.model, is_last_micro_batch)

    def clip_gradients(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.parallel.sync_gradients(self.model)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 \
            else float("inf")
        return self.parallel.clip_grad_norm_(self.model, max_norm)

    # -- saving --------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None) -> None:
        folder = output_dir or self.args.output_dir
        self.parallel.save_pretrained(self.model, folder)
        if self.parallel.is_main_process and self.processing_class is not None and \
                hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(folder)

    def _save_checkpoint(self) -> Path:
        """Every rank writes its DCP shards and helps gather the weights; rank 0 then assembles checkpoint-N."""
        from loom.distributed.checkpoint import gather_full_state

        root = Path(self.args.output_dir or "trainer_output")
        self._staging = root / f".dcp-staging-{self.state.global_step}"
        self.parallel.save_checkpoint(self._staging, self.model, self.optimizer)
        self._gathered = gather_full_state(self.model)
        path = root / f"{ckpt.PREFIX}-{self.state.global_step}"
        if self.parallel.is_main_process:
            path = super()._save_checkpoint()
        self.parallel.barrier()
        self._gathered = None
        return path

    def _write_checkpoint_files(self, folder: Path) -> None:
        from loom.distributed.checkpoint import write_gathered

        model, gathered, real = self.model, self._gathered, self.optimizer
        # the base writer calls model.save_pretrained and optimizer.state_dict(), which cannot see sharded tensors:
        # give it the gathered weights, and a placeholder optimizer.pt (the real state goes into dcp/)
        model.save_pretrained = lambda directory, **kw: write_gathered(model, directory, gathered, **kw)
        self.optimizer = _StateInDcp()
        try:
            super()._write_checkpoint_files(folder)
        finally:
            del model.save_pretrained
            self.optimizer = real
        shutil.move(str(self._staging), str(folder / "dcp"))

    def _load_model_weights(self, path: Path) -> None:
        """Weights from the checkpoint's dcp/ folder, resharded to this run's mesh (the base Trainer loads the
        optimizer state from there too); a checkpoint without one loads into a model that is not sharded."""
        path = Path(path)
        if (path / "dcp" / ".metadata").is_file():
            self.parallel.load_checkpoint(path / "dcp", self.model)
        elif _is_distributed(self.model):
            raise FileNotFoundError(f"checkpoint {path} has no dcp/ folder (a single-process Trainer wrote it), so its "
                                    "state cannot be loaded into this sharded (FSDP / tensor-parallel) model; resume it "
                                    "in one process or with plain data parallel, or start from its weights "
                                    "(from_pretrained) without resuming")
        else:
            super()._load_model_weights(path)


class _StateInDcp:
    """Stands in for the optimizer while the base Trainer writes optimizer.pt (a placeholder: the state is in dcp/)."""

    def state_dict(self) -> dict:
        return {"note": "the optimizer state of a ParallelTrainer checkpoint is in dcp/"}
