"""Process-group initialisation from torchrun's environment and the parallel dimensions -> named DeviceMesh.

Dimensions, outermost first: dp_replicate (plain data parallel / HSDP replicas), dp_shard (FSDP), cp (context
parallel), tp (tensor parallel, innermost so its ranks are neighbours). Derived, flattened dimensions:
`dp` = dp_replicate x dp_shard (ranks that see different samples), `dp_shard_cp` (what FSDP shards over: the cp ranks
hold the same parameters, so they share the shards) and `dp_cp` (ranks whose gradients are summed).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when not launched by torchrun."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def default_device(local_rank: int | None = None) -> torch.device:
    """This rank's device: its own CUDA device when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env_world()[2] if local_rank is None else local_rank)
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Returns False (and does nothing) for a single process that was not launched by torchrun. The backend follows the
    device (nccl on CUDA, gloo on CPU). Every collective is bounded by `timeout_s` (env LOOM_DIST_TIMEOUT, default
    600 s), so a rank that died makes the others fail with an error instead of hanging forever.
    """
    if dist.is_initialized():
        return True
    rank, world, local = env_world()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"RANK/WORLD_SIZE are set but {var} is not: launch with torchrun, or set {var}")
    device = default_device(local)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = float(timeout_s if timeout_s is not None else os.environ.get("LOOM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    return True


@dataclass
class ParallelDims:
    """Sizes of the parallel dimensions; `dp_shard=-1` takes whatever the other dimensions leave of the world."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims.{name} must be a positive integer, got {value!r}")
        rest = self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if self.world_size % rest:
                raise ValueError(f"world size {self.world_size} is not divisible by dp_replicate x cp x tp = "
                                 f"{self.dp_replicate} x {self.cp} x {self.tp} = {rest}; launch a multiple of "
                                 f"{rest} processes or change tp_size/cp_size")
            self.dp_shard = self.world_size // rest
        if not isinstance(self.dp_shard, int) or self.dp_shard < 1:
            raise ValueError(f"ParallelDims.dp_shard must be a positive integer or -1, got {self.dp_shard!r}")
        if self.dp_replicate * self.dp_shard * self.cp * self.tp != self.world_size:
            raise ValueError(f"dp_replicate x dp_shard x cp x tp = {self.dp_replicate} x {self.dp_shard} x "
                             f"{self.cp} x {self.tp} = {self.dp_replicate * self.dp_shard * self.cp * self.tp}, but "
                             f"the world size is {self.world_size}; their product must equal the number of processes")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def names(self) -> tuple[str, ...]:
        return ("dp_replicate", "dp_shard", "cp", "tp")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dp_replicate, self.dp_shard, self.cp, self.tp)

    def build_mesh(self, device_type: str | None = None) -> dict:
        """Name -> DeviceMesh: "world" (the 4-D mesh), its dimensions and the flattened `dp`, `dp_shard_cp`, `dp_cp`.

        The flattened meshes are returned rather than sliced from the root later, which torch deprecates.
        """
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs an initialised process group: call init_distributed() first "
                               "(or launch with torchrun)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims was made for world size {self.world_size}, but the process group has "
                             f"{dist.get_world_size()} ranks")
        device_type = device_type or default_device().type
        mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=self.names)
        meshes = {"world": mesh, **{name: mesh[name] for name in self.names}}
        meshes["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        meshes["dp_shard_cp"] = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        meshes["dp_cp"] = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return meshes
