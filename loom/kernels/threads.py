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
    Only the calling thread's count changes (see _this_thread_setter): concurrent callers each set and restore their
    own, and threads started meanwhile get torch's default.
    """
    n = torch.get_num_threads()
    if n <= 1 or getattr(_local, "pool_threads", 0) or not build.available():
        yield
        return
    _local.pool_threads = n
    set_own = _this_thread_setter()
    set_own(1)
    _spinning(+1)
    try:
        yield
    finally:
        _spinning(-1)
        set_own(n)
        _local.pool_threads = 0


_setter: list = []


def _this_thread_setter():
    """A function that sets torch's thread count for the calling thread only.

    torch.set_num_threads sets the count for the calling thread and also the process-wide default that a thread
    copies at its first parallel torch op: a thread started while a handoff was in force (a server's worker, a
    DataLoader's pin-memory thread) kept one thread for good. With torch on OpenMP (its CPU wheels), the count is
    OpenMP's per-thread `nthreads` setting, which `omp_set_num_threads` of the runtime torch loaded sets for the
    calling thread alone; that is used where it is found and checked to act (torch.get_num_threads() reads it back),
    torch.set_num_threads otherwise."""
    if not _setter:
        _setter.append(_find_omp_setter() or torch.set_num_threads)
    return _setter[0]


def _find_omp_setter():
    import ctypes
    import os

    if torch.__config__.parallel_info().find("ATen parallel backend: OpenMP") < 0:
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/lib" in line and any(
                name in line.rsplit("/", 1)[-1] for name in ("libgomp", "libiomp5", "libomp."))}
    except OSError:
        return None
    # other packages bring their own copies (scikit-learn's, sentencepiece's libgomp): torch's wheel keeps its
    # runtime in torch/lib; a torch linked to the system's has the only one loaded, or none is chosen
    own = {p for p in paths if os.path.dirname(p) == os.path.join(os.path.dirname(torch.__file__), "lib")}
    paths = own or paths
    if len(paths) != 1:
        return None
    try:
        fn = ctypes.CDLL(paths.pop()).omp_set_num_threads
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], None
    n = torch.get_num_threads()
    fn(1 if n != 1 else 2)
    works = torch.get_num_threads() == (1 if n != 1 else 2)
    fn(n)
    return fn if works and torch.get_num_threads() == n else None


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
