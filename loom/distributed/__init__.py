"""Distributed training on torch.distributed: mesh, tensor/context/data parallel, sampler, gradients, DCP.

Submodules import torch.distributed pieces lazily; `import loom.distributed` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ParallelDims": "mesh", "init_distributed": "mesh", "env_world": "mesh", "default_device": "mesh",
    "apply_tp": "tensor_parallel", "resolve_plan": "tensor_parallel", "TensorParallelLoadHook": "tensor_parallel",
    "apply_fsdp": "fsdp",
    "apply_cp": "context_parallel", "ring_attention": "context_parallel", "zigzag_shard": "context_parallel",
    "zigzag_unshard": "context_parallel", "shard_batch_for_cp": "context_parallel",
    "DistributedSampler": "sampler",
    "clip_grad_norm_": "grad", "sync_gradients": "grad", "total_grad_norm": "grad",
    "save_dcp": "checkpoint", "load_dcp": "checkpoint", "dcp_to_hf": "checkpoint",
    "save_pretrained_distributed": "checkpoint",
    "ParallelContext": "context", "setup_parallel": "context",
    "launch_local": "launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"loom.distributed.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'loom.distributed' has no attribute {name!r}")
