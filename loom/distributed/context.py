"""ParallelContext: the one object a training loop (loom's Trainer or a user's own) asks about parallelism.

    ctx = setup_parallel(args)                     # tp_size / cp_size / fsdp from TrainingArguments, or keywords
    model = ctx.wrap_model(model)                  # tensor parallel -> context parallel -> FSDP2 (or replicate)
    sampler = ctx.sampler(dataset, seed=args.seed) # distinct samples per dp rank; cp/tp ranks share them
    n = ctx.count_tokens(micro_batches)            # label tokens of the whole global batch of this step
    for i, batch in enumerate(micro_batches):
        with ctx.gradient_sync(model, i == len(micro_batches) - 1):
            loss = ctx.compute_loss(model, ctx.prepare_batch(batch), n)
            loss.backward()
    ctx.sync_gradients(model); ctx.clip_grad_norm_(model, 1.0); optimizer.step()
    ctx.reduce_loss(loss_sum)                      # the global mean for logging

A single process (no torchrun) gets the same object with every size 1, and every method degrades to a no-op.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from loom.distributed.mesh import ParallelDims, default_device, init_distributed


@dataclass
class ParallelContext:
    dims: ParallelDims
    mesh: object | None = None  # the 4-D DeviceMesh (dp_replicate, dp_shard, cp, tp); pass it as device_mesh=
    meshes: dict | None = None  # name -> 1-D DeviceMesh, the flattened dp / dp_shard_cp / dp_cp included
    device: torch.device = torch.device("cpu")
    fsdp: bool = False
    param_dtype: torch.dtype | None = None
    cpu_offload: bool = False

    # -- ranks ---------------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.mesh is not None

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.enabled else 0

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def _local_rank(self, dim: str) -> int:
        return self.meshes[dim].get_local_rank() if self.enabled else 0

    @property
    def dp_rank(self) -> int:
        return self._local_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def cp_rank(self) -> int:
        return self._local_rank("cp")

    @property
    def cp_size(self) -> int:
        return self.dims.cp

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    def group(self, dim: str):
        """The process group of a mesh dimension ('dp', 'cp', 'tp', 'dp_cp', ...), or None in one process."""
        return self.meshes[dim].get_group() if self.enabled else None

    @property
    def uses_fsdp(self) -> bool:
        return self.enabled and self.fsdp and self.dims.dp_shard * self.dims.cp > 1

    # -- model ---------------------------------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Apply tensor parallel, context parallel and FSDP2 (or replicate) in that order; returns the model."""
        if not self.enabled:
            return model.to(self.device) if not _on_meta(model) else model
        from loom.distributed.context_parallel import apply_cp
        from loom.distributed.fsdp import apply_fsdp
        from loom.distributed.tensor_parallel import apply_tp

        if not _is_distributed(model):
            model.to(self.device)
        tp_mesh = getattr(model, "_loom_tp_mesh", None)
        if tp_mesh is not None and tp_mesh.size() != self.tp_size:
            raise ValueError(f"the model is already tensor-parallel over {tp_mesh.size()} ranks (loaded with tp_plan=) "
                             f"but the run's tp_size is {self.tp_size}; pass TrainingArguments(tp_size="
                             f"{tp_mesh.size()}) (or setup_parallel(tp_size={tp_mesh.size()})), or load the model "
                             "without tp_plan and let the trainer shard it")
        if self.tp_size > 1 and tp_mesh is None:
            apply_tp(model, self.meshes["tp"])
        if self.cp_size > 1:
            apply_cp(model, self.meshes["cp"])
        if self.uses_fsdp:
            dp_mesh = self.mesh["dp_replicate", "dp_shard_cp"] if self.dims.dp_replicate > 1 \
                else self.meshes["dp_shard_cp"]
            apply_fsdp(model, dp_mesh, param_dtype=self.param_dtype, cpu_offload=self.cpu_offload)
        else:
            self._broadcast_parameters(model)
        return model

    @torch.no_grad()
    def _broadcast_parameters(self, model: nn.Module) -> None:
        """Replicated training: start every dp/cp replica from the same weights (those of its first rank)."""
        group = self.group("dp_cp")
        if dist.get_world_size(group) == 1:
            return
        src = dist.get_global_rank(group, 0)
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(_local(t), src=src, group=group)

    # -- data ----------------------------------------------------------------------------------------------------
    def sampler(self, dataset: Sized, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        """A DistributedSampler over the data-parallel ranks (cp and tp ranks of one dp rank get the same one)."""
        from loom.distributed.sampler import DistributedSampler

        return DistributedSampler(dataset, self.dp_size, self.dp_rank, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last)

    def prepare_batch(self, batch: dict) -> dict:
        """Move a batch to this rank's device and, under context parallel, keep this rank's zig-zag chunks."""
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if self.cp_size > 1:
            from loom.distributed.context_parallel import shard_batch_for_cp

            batch = shard_batch_for_cp(batch, self.cp_rank, self.cp_size)
        return batch

    def count_tokens(self, batches: Iterable[dict]) -> torch.Tensor:
        """Label tokens that count for the loss (shifted, != -100) in these micro-batches over all dp ranks."""
        local = sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches)
        return self._sum(local, "dp")

    # -- loss and gradients --------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, batch: dict, num_items_in_batch=None) -> torch.Tensor:
        """Causal-LM loss of a prepared batch: sum of this rank's token losses / num_items_in_batch."""
        if "shift_labels" not in batch:
            return model(**batch, num_items_in_batch=num_items_in_batch, use_cache=False).loss
        from loom.models.common import token_loss

        inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
        logits = model(**inputs, use_cache=False).logits
        return token_loss(logits, batch["shift_labels"], num_items_in_batch)

    def gradient_sync(self, model: nn.Module, enabled: bool):
        """Context for one accumulation micro-step: FSDP reduces gradients only when `enabled` (the last one)."""
        if self.uses_fsdp:
            model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def sync_gradients(self, model: nn.Module) -> None:
        """Sum replicated gradients over dp x cp once per optimizer step (FSDP already reduced its own)."""
        if self.enabled and not self.uses_fsdp:
            from loom.distributed.grad import sync_gradients

            sync_gradients(model.parameters(), self.group("dp_cp"))

    def clip_grad_norm_(self, model_or_params, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        from loom.distributed.grad import clip_grad_norm_

        return clip_grad_norm_(model_or_params, max_norm, norm_type)

    def reduce_loss(self, loss: torch.Tensor | float) -> torch.Tensor:
        """Sum per-rank losses (each already divided by the global token count) into the global mean loss."""
        return self._sum(loss.detach() if torch.is_tensor(loss) else loss, "dp_cp")

    def train_step(self, model: nn.Module, optimizer, micro_batches: list[dict],
                   max_grad_norm: float | None = None) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches (gradient accumulation when several): the loss is
        normalised by the label tokens of all of them over every dp rank, gradients are synced once, clipped to
        `max_grad_norm` when given, and applied. Returns the global mean loss of the step."""
        n = self.count_tokens(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            with self.gradient_sync(model, i == len(micro_batches) - 1):
                loss = self.compute_loss(model, self.prepare_batch(batch), n)
                loss.backward()
            total += loss.detach()
        self.sync_gradients(model)
        if max_grad_norm is not None:
            self.clip_grad_norm_(model, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return self.reduce_loss(total)

    def _sum(self, value, dim: str) -> torch.Tensor:
        from loom.distributed.grad import all_reduce_sum

        return all_reduce_sum(value, self.group(dim), device=self.device)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, directory, model: nn.Module, optimizer=None, extra_state: dict | None = None):
        from loom.distributed.checkpoint import save_dcp

        return save_dcp(directory, model, optimizer, extra_state)

    def load_checkpoint(self, directory, model: nn.Module, optimizer=None) -> dict:
        from loom.distributed.checkpoint import load_dcp

        return load_dcp(directory, model, optimizer)

    def save_pretrained(self, model: nn.Module, directory, **kwargs) -> None:
        """A normal `from_pretrained` checkpoint from a parallelised model (rank 0 writes; every rank calls)."""
        if not self.enabled:
            model.save_pretrained(directory, **kwargs)
            return
        from loom.distributed.checkpoint import save_pretrained_distributed

        save_pretrained_distributed(model, directory, **kwargs)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _is_distributed(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _fsdp_options(fsdp) -> tuple[bool, bool]:
    """(enabled, cpu offload) from TrainingArguments.fsdp: a bool, "full_shard offload", or a list of options."""
    if isinstance(fsdp, str):
        options = fsdp.split()
    elif isinstance(fsdp, (list, tuple)):
        options = [str(o) for o in fsdp]
    else:
        return bool(fsdp), False
    return bool(options), "offload" in options


def setup_parallel(args=None, *, tp_size: int | None = None, cp_size: int | None = None, fsdp=None,
                   dp_replicate: int | None = None, param_dtype=None, timeout_s: float | None = None
                   ) -> ParallelContext:
    """Initialise torch.distributed from torchrun's environment and build the mesh from the parallel sizes.

    Sizes come from the keywords, else from `args` (TrainingArguments: tp_size, cp_size, fsdp, bf16/fp16), else 1.
    Without torchrun this returns a single-process context; asking for tp/cp > 1 there is an error.
    """
    def pick(value, name, default):
        return value if value is not None else getattr(args, name, None) or default

    tp, cp = int(pick(tp_size, "tp_size", 1)), int(pick(cp_size, "cp_size", 1))
    replicate = int(pick(dp_replicate, "dp_replicate_size", 1))
    fsdp_on, offload = _fsdp_options(pick(fsdp, "fsdp", False))
    if offload and default_device().type == "cpu":
        raise ValueError("fsdp 'offload' moves sharded parameters to the CPU between uses, which needs an accelerator; "
                         "on a CPU-only machine the parameters already live on the CPU: drop 'offload'")
    if param_dtype is None and args is not None:
        param_dtype = torch.bfloat16 if getattr(args, "bf16", False) else \
            torch.float16 if getattr(args, "fp16", False) else None
    init_distributed(timeout_s=timeout_s)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims(dp_replicate=replicate, cp=cp, tp=tp, world_size=world)
    device = default_device()
    meshes = dims.build_mesh(device.type) if world > 1 else None
    return ParallelContext(dims=dims, mesh=meshes["world"] if meshes else None, meshes=meshes, device=device, fsdp=fsdp_on, param_dtype=param_dtype,
                           cpu_offload=offload)
