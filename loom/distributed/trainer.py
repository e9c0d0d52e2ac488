"""How the Trainer writes and reads checkpoints: plain files in one process, DCP shards under parallelism.

The Trainer holds a ParallelContext (every size 1 and every method a no-op in one process) and one of the two
strategies below, chosen by whether the context is enabled, so one Trainer class runs with `python train.py` and
with `torchrun --nproc_per_node N train.py`.

A DcpCheckpoints checkpoint-N/ holds the gathered model.safetensors (loadable by from_pretrained in one process), the
trainer's usual state files, a placeholder optimizer.pt, and dcp/ with the sharded model + optimizer state, which
resumes at any world size (with the same global batch: see CheckpointMixin._check_data_position) and in a
single-process Trainer.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from loom.distributed.context import ParallelContext, _is_distributed
from loom.training import checkpoints as ckpt


class FileCheckpoints:
    """One process: save_pretrained for the weights, optimizer.pt for the optimizer state."""

    def __init__(self, parallel: ParallelContext) -> None:
        self.parallel = parallel

    def begin(self, model: nn.Module, optimizer, staging: Path) -> None:
        """Called on every rank before rank 0 writes the checkpoint folder."""

    def write_model(self, model: nn.Module, folder: Path) -> None:
        ckpt.save_model_files(model, folder)

    def write_optimizer(self, optimizer, folder: Path) -> None:
        ckpt.save_torch(optimizer.state_dict(), folder / "optimizer.pt")

    def end(self) -> None:
        """Called on every rank after the checkpoint folder is complete."""

    def load_model_weights(self, model: nn.Module, path: Path, load_files) -> None:
        """Weights of checkpoint `path` into the live model; `load_files(path)` is the Trainer's file loader."""
        load_files(path)


class DcpCheckpoints(FileCheckpoints):
    """Under parallelism: every rank writes its DCP shards and helps gather the full weights; rank 0 writes the
    gathered model.safetensors and moves the shards into checkpoint-N/dcp."""

    def begin(self, model: nn.Module, optimizer, staging: Path) -> None:
        from loom.distributed.checkpoint import gather_full_state

        self._staging = staging
        self.parallel.save_checkpoint(staging, model, optimizer)
        self._gathered = gather_full_state(model)

    def write_model(self, model: nn.Module, folder: Path) -> None:
        from loom.distributed.checkpoint import write_gathered

        write_gathered(model, folder, self._gathered)
        shutil.move(str(self._staging), str(folder / "dcp"))  # the sharded model and optimizer state

    def write_optimizer(self, optimizer, folder: Path) -> None:
        # the optimizer's state is sharded like the model: it lives in dcp/, optimizer.pt only says so
        ckpt.save_torch({"note": "the optimizer state of this checkpoint is in dcp/"}, folder / "optimizer.pt")

    def end(self) -> None:
        self.parallel.barrier()
        self._gathered = None

    def load_model_weights(self, model: nn.Module, path: Path, load_files) -> None:
        """Resharded to this run's mesh from dcp/; a checkpoint without one loads only into an unsharded model."""
        if (path / "dcp" / ".metadata").is_file():
            self.parallel.load_checkpoint(path / "dcp", model)
        elif _is_distributed(model):
            raise FileNotFoundError(f"checkpoint {path} has no dcp/ folder (a single-process Trainer wrote it), so its "
                                    "state cannot be loaded into this sharded (FSDP / tensor-parallel) model; resume it "
                                    "in one process or with plain data parallel, or start from its weights "
                                    "(from_pretrained) without resuming")
        else:
            load_files(path)


def checkpoint_strategy(parallel: ParallelContext) -> FileCheckpoints:
    return DcpCheckpoints(parallel) if parallel.enabled else FileCheckpoints(parallel)
