"""FSDP2: `fully_shard` on every decoder block, then on the root; composes with tensor parallel on a 2-D mesh."""
from __future__ import annotations

import torch
from torch import nn

from loom.utils import parse_dtype


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: instances of the model's `_no_split_modules` classes (decoder blocks)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names or
              any(base.__name__ in names for base in type(m).__mro__[1:])]
    if not blocks:  # no declared blocks: the children of the largest ModuleList
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    return blocks


def apply_fsdp(model: nn.Module, dp_mesh, *, param_dtype: torch.dtype | str | None = None,
               reduce_dtype: torch.dtype | str | None = torch.float32, cpu_offload: bool = False,
               reshard_after_forward: bool = True, sum_gradients: bool = True) -> nn.Module:
    """Shard `model`'s parameters over `dp_mesh` with FSDP2 (in place); returns the model.

    param_dtype: the dtype of the gathered parameters in forward/backward (mixed precision, e.g. torch.bfloat16);
    the sharded master copy keeps its own dtype. reduce_dtype: the dtype of the gradient reduce-scatter.
    sum_gradients: gradients are summed over the dp ranks instead of averaged; loom's training loop divides the loss
    by the global token count, so the sum is the exact gradient of the global batch.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=parse_dtype(param_dtype), reduce_dtype=parse_dtype(reduce_dtype))
    kwargs = dict(mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in _blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    force_sum = _backend(dp_mesh) != "nccl"  # gloo has neither AVG nor PREMUL_SUM: reduce with SUM, then scale
    for module in model.modules():  # these setters act on one FSDP module's own parameter group only
        if isinstance(module, FSDPModule):
            if sum_gradients:
                module.set_gradient_divide_factor(1.0)
            if force_sum:
                module.set_force_sum_reduction_for_comms(True)
    return model


def _backend(mesh) -> str:
    import torch.distributed as dist

    groups = mesh.get_all_groups()
    return dist.get_backend(groups[0]) if groups else "gloo"

