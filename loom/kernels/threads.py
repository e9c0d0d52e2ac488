"""How many threads the kernels use, and the decode loop's thread hand-off between torch and the kernels' pool."""
from __future__ import annotations

import contextlib
import ctypes
import os
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
    MKL inside torch keeps a count of its own (`torch.sin`/`cos` go to MKL's vector math, which started a second
    thread for a rope table of 256 values): that is set to one for the calling thread too (`_mkl_local_setter`).
    Only the calling thread's count changes (see _this_thread_setter): concurrent callers each set and restore their
    own, and threads started meanwhile get torch's default.
    """
    n = torch.get_num_threads()
    if n <= 1 or getattr(_local, "pool_threads", 0) or not build.available():
        yield
        return
    _local.pool_threads = n
    set_own, set_mkl = _this_thread_setter(), _mkl_local_setter()
    set_own(1)
    mkl_before = set_mkl(1) if set_mkl else 0
    _spinning(+1)
    try:
        yield
    finally:
        _spinning(-1)
        if set_mkl:
            set_mkl(mkl_before)
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


def _torch_lib_dir() -> str:
    return os.path.join(os.path.dirname(torch.__file__), "lib")


def _mapped_libraries() -> set[str] | None:
    """The paths of the shared libraries mapped into this process (/proc/self/maps), or None where it cannot be read."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if "/lib" in line}
    except OSError:
        return None


def _find_omp_setter():
    if torch.__config__.parallel_info().find("ATen parallel backend: OpenMP") < 0:
        return None
    mapped = _mapped_libraries()
    if mapped is None:
        return None
    paths = {p for p in mapped if any(name in os.path.basename(p) for name in ("libgomp", "libiomp5", "libomp."))}
    # other packages bring their own copies (scikit-learn's, sentencepiece's libgomp): torch's wheel keeps its
    # runtime in torch/lib; a torch linked to the system's has the only one loaded, or none is chosen
    own = {p for p in paths if os.path.dirname(p) == _torch_lib_dir()}
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


_mkl_setter: list = []


def _mkl_local_setter():
    """MKL's `MKL_Set_Num_Threads_Local` of the MKL torch carries (its CPU wheels link it into libtorch_cpu), or None.

    It sets MKL's thread count for the calling thread only and returns the one it replaces (0: MKL's global count);
    torch's own count does not reach it from omp_set_num_threads. Without it, a decode step's `torch.sin` of the
    rotary table (MKL's vector math) woke MKL's second OpenMP thread while the kernels' pool helper spun on the other
    core: 1-1.5 ms a call in one step in ten, and batch-8 fp32 decode at 2 threads no faster than at 1 (310 -> 443
    tokens/s with it set, 2 vCPUs)."""
    if not _mkl_setter:
        _mkl_setter.append(_find_mkl_local())
    return _mkl_setter[0] and _mkl_setter[0][0]


def mkl_threads() -> int | None:
    """MKL's thread count for the calling thread (None where torch carries no MKL loom can reach)."""
    _mkl_local_setter()
    return _mkl_setter[0][1]() if _mkl_setter[0] else None


def _find_mkl_local():
    if not torch.backends.mkl.is_available():
        return None
    mapped = _mapped_libraries()
    if mapped is None:
        return None
    for path in sorted(p for p in mapped if os.path.dirname(p) == _torch_lib_dir() or "libmkl_rt" in p):
        try:
            lib = ctypes.CDLL(path)
            setter, getter = lib.MKL_Set_Num_Threads_Local, lib.MKL_Get_Max_Threads
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        getter.argtypes, getter.restype = [], ctypes.c_int
        had = getter()
        want = 1 if had != 1 else 2
        before = setter(want)
        works = getter() == want
        setter(before)
        return (setter, getter) if works and getter() == had else None
    return None


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
