"""Process-group initialisation from torchrun's environment and the parallel dimensions -> named DeviceMesh.

Dimensions, outermost first: dp_replicate (plain data parallel / HSDP replicas), dp_shard (FSDP), cp (context
parallel), tp (tensor parallel, innermost so its ranks are neighbours). Derived, flattened dimensions:
`dp` = dp_replicate x dp_shard (ranks that see different samples), `dp_shard_cp` (what FSDP shards over: the cp ranks
hold the same parameters, so they share the shards) and `dp_cp` (ranks whose gradients are summed).
"""
from __future__ import annotations

import atexit
import datetime
import os
import time
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
        settle_gloo_at_exit()
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
    settle_gloo_at_exit()
    return True


# -- a clean exit with gloo ---------------------------------------------------------------------------------------------
# torch's gloo process group runs each collective on worker threads ("pt_gloo_runloop") that drop their reference to the
# finished work only after the waiting caller has been released. When that reference is the last one to a tensor with
# a Python object (a functional collective's output, e.g. a DTensor gather), the worker takes the GIL to free it. If the
# main thread has meanwhile reached interpreter finalization, taking the GIL ends the worker thread by a forced unwind
# through a noexcept frame, and the process aborts after all its work ("terminate called without an active
# exception", seen about once in 80 runs of a 2-rank TP script on a busy machine; cf. pytorch#179291).
# destroy_process_group() does not join those threads: they live until the last reference to the group (a DeviceMesh,
# a DTensor's spec) goes, usually in finalization. So at exit, while the interpreter is still whole, loom waits
# (GIL released) until every gloo worker thread is blocked idle, which lets any pending release finish first.
_SETTLE_POLL_S = 0.002
_SETTLE_QUIET_POLLS = 3
_SETTLE_LIMIT_S = 1.0
_settle_registered = False


def _gloo_worker_states() -> list[str] | None:
    """The scheduler state letter of each gloo worker thread of this process; None where /proc cannot tell."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    states = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name_end = stat.rfind(")")
        if stat[stat.find("(") + 1:name_end].startswith("pt_gloo_runloop"):
            states.append(stat[name_end + 2:name_end + 3])
    return states


def settle_gloo_threads(limit_s: float = _SETTLE_LIMIT_S) -> bool:
    """Wait, with the GIL released, until every gloo worker thread has been seen blocked (not running or runnable)
    on `_SETTLE_QUIET_POLLS` polls in a row, at most `limit_s` seconds. Returns whether they settled (True when there
    are none, or where /proc is not available: nothing to wait for that loom could see)."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    while True:
        states = _gloo_worker_states()
        if not states:
            return True
        quiet = quiet + 1 if all(s in "SDI" for s in states) else 0
        if quiet >= _SETTLE_QUIET_POLLS:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_SETTLE_POLL_S)


def settle_gloo_at_exit() -> None:
    """Register (once) the exit handler that lets gloo's worker threads finish before interpreter finalization.
    Called wherever loom joins or uses a process group (init_distributed, tensor-parallel meshes)."""
    global _settle_registered
    if not _settle_registered:
        atexit.register(settle_gloo_threads)  # returns at once when the process has no gloo worker threads
        _settle_registered = True


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
