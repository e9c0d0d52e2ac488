"""Build, cache and call loom's C kernel library through ctypes: dense fp32/bf16 GEMMs for decode-sized inputs
(loom/native_source.py, used by `loom.models.common.linear`) and int8/int4 weight-only GEMMs
(loom/quantization/native_source.py, used by the built-in quantized Linears).

The library is compiled on first use with the system C compiler into a per-user cache directory, named by a hash
of the source, the flags and the compiler, and moved into place atomically so concurrent processes never load a
half-written file. It splits work over torch.get_num_threads() threads with its own small pthread pool rather
than OpenMP (see the source's header: OpenMP's end-of-region barrier stalls on busy machines), so no second
OpenMP runtime is loaded next to torch's. Anything missing (not Linux x86-64, no AVX2/FMA/F16C, no compiler, a
failed build) makes `library()` return None and the callers use the torch path.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from loom.native_source import SOURCE as CORE_SOURCE
from loom.quantization.native_source import SOURCE as QUANT_SOURCE

SOURCE = CORE_SOURCE + QUANT_SOURCE

# no FMA contraction: the int4 quantizer must round exactly like the torch version
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
_state: dict[str, object] = {}


def cache_dir() -> Path:
    base = os.environ.get("LOOM_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loom" / "kernels"


def _cpu_supported() -> bool:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return all(f in flags for f in _REQUIRED_CPU_FLAGS)


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, _compiler_id(cc)]).encode()).hexdigest()[:16]
    target = cache_dir() / f"loom_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / target.name
        src.write_text(SOURCE)
        proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-800:]}")
        os.replace(out, target)  # atomic: another process sees either no file or the whole library
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.loom_dense_gemm.argtypes = [p, i32, p, i32, p, i32, p, i32, i64, i64, i64, i32]
    lib.loom_dense_gemm.restype = i32
    lib.loom_int8_gemm.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.loom_int8_gemm.restype = i32
    lib.loom_int4_gemm.argtypes = [p, p, p, p, i32, p, i64, i64, i64, i64, i32]
    lib.loom_int4_gemm.restype = i32
    lib.loom_int4_dequantize.argtypes = [p, p, p, i32, p, i64, i64, i64, i32]
    lib.loom_int4_dequantize.restype = None
    lib.loom_int4_quantize_asymmetric.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.loom_int4_quantize_asymmetric.restype = None
    lib.loom_set_spin.argtypes = [i32]
    lib.loom_set_spin.restype = None
    lib.loom_rms_norm.argtypes = [p, p, p, i32, i64, i64, ctypes.c_float, i32]
    lib.loom_rms_norm.restype = None
    lib.loom_decode_attention.argtypes = [p, i64, i64, p, i64, i64, i64, p, i64, i64, i64, p, i64, p, i32, i64, i64,
                                          i64, i64, i64, ctypes.c_float, i32]
    lib.loom_decode_attention.restype = i32
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be built here (then the torch path is used)."""
    if "lib" in _state:
        return _state["lib"]
    lib = None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if _cpu_supported() and cc:
        try:
            lib = _declare(ctypes.CDLL(str(_build(cc))))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            warnings.warn(f"loom could not build its CPU kernels ({err}); decode-sized and quantized Linears "
                          "use the slower torch path", RuntimeWarning, stacklevel=2)
    _state["lib"] = lib
    return lib


def _threads() -> int:
    return getattr(_local, "pool_threads", 0) or max(1, torch.get_num_threads())


_local = threading.local()


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
    if n <= 1 or getattr(_local, "pool_threads", 0) or library() is None:
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


DECODE_SPINS = 50000  # pause instructions a pool helper waits for the next job before sleeping, during handoffs
_spin_lock = threading.Lock()


def _spinning(change: int) -> None:
    """Count handoffs in force; helpers spin between jobs while any is (see loom_set_spin in the C source)."""
    with _spin_lock:
        _state["handoffs"] = _state.get("handoffs", 0) + change
        library().loom_set_spin(DECODE_SPINS if _state["handoffs"] > 0 else 0)


def dense_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               out_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """x (M, K) contiguous @ weight (N, K).T + bias -> (M, N) (or `out_shape`) in x's dtype; each of x, weight and
    bias fp32 or bf16.

    For a few rows (decode): the weight is read once, sums are fp32, a bf16 result is rounded to nearest even."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(out_shape or (m, n), dtype=x.dtype)
    bf16 = torch.bfloat16
    status = library().loom_dense_gemm(x.data_ptr(), x.dtype is bf16, weight.data_ptr(), weight.dtype is bf16,
                                       None if bias is None else bias.data_ptr(),
                                       bias is not None and bias.dtype is bf16, y.data_ptr(), x.dtype is bf16, m, n, k,
                                       _threads())
    if status != 0:
        raise MemoryError(f"dense kernel: could not allocate {m}x{k} activation scratch")
    return y


def int8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) contiguous float32 @ (int8 weight (N, K) * scale (N,)).T -> (M, N) float32.

    Each row of x is rounded to int16 with its own scale (max|x| / 32767) first, so an output differs from the
    float product by at most max|x| / 65534 * sum_k |w[n, k] * scale[n]| (rows with inf/NaN stay in float32)."""
    m, k = x.shape
    y = torch.empty(m, weight.shape[0], dtype=torch.float32)
    status = library().loom_int8_gemm(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), m,
                                      weight.shape[0], k, _threads())
    if status != 0:
        raise MemoryError(f"int8 kernel: could not allocate {m}x{k} int16 activation scratch")
    return y


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              group_size: int) -> torch.Tensor:
    """x (M, K) contiguous float32 @ dequant(packed int4 (N, K/2), scale/zero (N, K/group)).T -> (M, N)."""
    m, k = x.shape
    y = torch.empty(m, packed.shape[0], dtype=torch.float32)
    if m == 0:
        return y
    status = library().loom_int4_gemm(x.data_ptr(), packed.data_ptr(), scale.data_ptr(),
                                      None if zero is None else zero.data_ptr(), int(scale.dtype == torch.float16),
                                      y.data_ptr(), m, packed.shape[0], k, group_size, _threads())
    if status != 0:
        raise MemoryError(f"int4 kernel: could not allocate {m}x{k} activation scratch")
    return y


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    """The float32 (N, K) weight of a packed int4 one, bit-identical to the torch reference."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.float32)
    library().loom_int4_dequantize(packed.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(),
                                   int(scale.dtype == torch.float16), out.data_ptr(), n, k, group_size, _threads())
    return out


def int4_quantize_asymmetric(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """The C version of linear.quantize_int4_asymmetric: (packed (N, K/2) uint8, scale, zero (N, K/G) float16)."""
    w = weight.detach().float().contiguous()
    n, k = w.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale = torch.empty(n, k // group_size, dtype=torch.float16)
    zero = torch.empty_like(scale)
    library().loom_int4_quantize_asymmetric(w.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, k,
                                            group_size, _threads())
    return packed, scale, zero


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of contiguous x (..., n) with weight (n,), both fp32 or both bf16, rounded as the reference does."""
    y = torch.empty_like(x)
    n = x.shape[-1]
    library().loom_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.dtype is torch.bfloat16,
                            x.numel() // n if n else 0, n, eps, _threads())
    return y


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query per head: q (B, H, 1, D), k/v (B, Hkv, L, D), unit stride along D; mask
    None or bool (B or 1, 1, 1, L) with unit stride along L (True = attend). Returns (B, H, 1, D), a view of a
    contiguous (B, 1, H, D) buffer, so the usual transpose(1, 2).reshape for the output projection is free."""
    B, H, _, D = q.shape
    L = k.shape[2]
    out = torch.empty(B, 1, H, D, dtype=q.dtype)
    m_sb = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    status = library().loom_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), None if mask is None else mask.data_ptr(), m_sb,
        out.data_ptr(), q.dtype is torch.bfloat16, B, H, k.shape[1], L, D, scale, _threads())
    if status != 0:
        raise MemoryError(f"attention kernel: could not allocate scores for {L} keys")
    return out.transpose(1, 2)
