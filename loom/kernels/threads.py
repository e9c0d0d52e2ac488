"""How many threads the kernels use, and the decode loop's thread hand-off between torch and the kernels' pool."""
from __future__ import annotations

import contextlib
import threading

import torch

from loom.kernels import build

_local = threading.local()
_spin_lock = threading.Lock()
_handoffs = [0]

DECODE_SPINS = 50000  # pause instructions a pool helper waits for the next job before sleeping, during handoffs


def pool_threads() -> int:
    """Threads for one kernel call: torch's count for the calling thread, or the count a handoff saved."""
    return getattr(_local, "pool_threads", 0) or max(1, torch.get_num_threads())


@contextlib.contextmanager
def kernels_own_threads():
    """Run torch's own ops on one thread while loom's kernels keep torch's thread count (for a decode loop).

    In a decode step loom's kernels do the heavy work on their own pool; torch is left dozens of tiny ops per layer,
    each of which would wake torch's OpenMP team, whose threads then spin and compete with the pool's for the same
    cores (measured on 2 vCPUs: +14% decode tokens/s with torch on one thread). Restores the count on exit.
    Torch keeps its thread count per OS thread (a thread's first torch call copies the last value set anywhere), so
    this acts on the calling thread, and concurrent callers each set and restore their own.
    """
    n = torch.get_num_threads()
    if n <= 1 or getattr(_local, "pool_threads", 0) or not build.available():
        yield
        return
    _local.pool_threads = n
    torch.set_num_threads(1)
    _spinning(+1)
    try:
        yield
    finally:
        _spinning(-1)
        torch.set_num_threads(n)
        _local.pool_threads = 0


def _spinning(change: int) -> None:
    """Count handoffs in force; pool helpers spin between jobs while any is (see loom_set_spin in csrc/pool.c)."""
    with _spin_lock:
        _handoffs[0] += change
        build.library().loom_set_spin(DECODE_SPINS if _handoffs[0] > 0 else 0)


def pool_helpers() -> int:
    """Helper threads the kernels' pool has started in this process (0 before its first parallel job)."""
    return build.library().loom_pool_helpers() if build.available() else 0


def handoffs_in_force() -> int:
    return _handoffs[0]
