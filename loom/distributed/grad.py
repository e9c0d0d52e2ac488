"""Gradient synchronisation and global gradient-norm clipping that work on DTensors, plain tensors and mixes of both.

Loss convention: each rank computes sum(token losses) / (token count of the whole global batch), so gradients are
*summed* across data-parallel (and context-parallel) ranks, never averaged; 2 ranks x B/2 then equal 1 rank x B.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def all_reduce_sum(value: torch.Tensor | float | int, group=None, device=None) -> torch.Tensor:
    """Sum a number or tensor over `group` (a copy; single process: returned as a tensor unchanged)."""
    t = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value, device=device)
    if dist.is_initialized() and group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


@torch.no_grad()
def sync_gradients(parameters: Iterable[torch.Tensor], group) -> None:
    """Sum the gradients of replicated (non-FSDP) parameters over `group`: one flat all-reduce per dtype.

    Call once per optimizer step, after the last accumulation micro-step, so intermediate steps cost nothing.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _group_key(t: torch.Tensor):
    from torch.distributed.tensor import DTensor

    return id(t.device_mesh) if isinstance(t, DTensor) else None


@torch.no_grad()
def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients together, whatever mix of DTensors (any meshes) and plain tensors holds them.

    Gradients are grouped by mesh; each group's norm is reduced over its shards (`full_tensor`), so replicated
    pieces count once and sharded ones are summed.
    """
    from torch.distributed.tensor import DTensor

    norm_type = float(norm_type)
    groups: dict = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(_group_key(p.grad), []).append(p.grad)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append((n.full_tensor() if isinstance(n, DTensor) else n).float().cpu())
    if not norms:
        return torch.tensor(0.0)
    stacked = torch.stack(norms)
    return stacked.max() if math.isinf(norm_type) else stacked.norm(norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor] | nn.Module, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most `max_norm`; returns the norm before clipping.

    Unlike torch.nn.utils.clip_grad_norm_, this accepts plain tensors mixed with DTensors on different meshes (a
    tensor-parallel model whose norms stay replicated, FSDP x TP), the case that fails with "mixed torch.Tensor and
    DTensor" elsewhere.
    """
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    total = total_grad_norm(params, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total gradient norm is {total.item()}; the loss or gradients are not finite. Pass "
                           "error_if_nonfinite=False to clip anyway")
    coef = min(1.0, float(max_norm) / (float(total) + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                _local(p.grad).mul_(coef)
    return total
