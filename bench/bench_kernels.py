"""loom's C kernels alone, against the memory they must read: GB/s streamed per kernel and its share of this
machine's measured read bandwidth (issue 22: decode kernels at >= 80% of the bandwidth floor).

    .venv/bin/python bench/bench_kernels.py [--kernels dense,int8,int4] [--rows 1,8] [--threads 1,2] [--reps 30]

The shapes are the bench checkpoint's Linears (bench/bench_generate.py: hidden 768, intermediate 2048, vocab 50257).
Each kernel runs on weights larger than the caches (several copies, cycled), so every call reads its weight from
memory. Times are medians; at one thread GB/s, shares and the torch column come from this process's CPU time (robust
to a busy machine), at more threads from wall time. The bandwidth is the faster of two plain streaming reads of 512 MB on the same thread count: torch.sum, and a small C
loop compiled here (AVX2 loads into four independent sums: nothing but the read, whatever torch's reduction costs). Dense rows also time torch's F.linear on the same weight (the `torch` column: loom's speed-up).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {"qkvo 768x768": (768, 768), "up 2048x768": (2048, 768), "down 768x2048": (768, 2048),
          "head 50257x768": (50257, 768)}
COPIES_BYTES = 256 << 20  # cycle through at least this many bytes of weights


_READ_C = r"""
#include <immintrin.h>
float loom_bench_read(const float *p, long n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (long i = 0; i + 32 <= n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(p + i)); b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16)); d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
    float out[8]; _mm256_storeu_ps(out, s);
    return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}
"""


def _c_reader():
    """The C streaming read as a ctypes function, or None without gcc or AVX2."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or "avx2" not in open("/proc/cpuinfo").read():
        return None
    tmp = tempfile.mkdtemp(prefix="loom-bench-read-")
    src, lib = os.path.join(tmp, "read.c"), os.path.join(tmp, "read.so")
    with open(src, "w") as f:
        f.write(_READ_C)
    if subprocess.run([cc, "-O2", "-mavx2", "-shared", "-fPIC", src, "-o", lib], capture_output=True).returncode:
        return None
    fn = ctypes.CDLL(lib).loom_bench_read
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_void_p, ctypes.c_long]
    return fn


def read_bandwidth(threads: int, reps: int = 5) -> tuple[float, str]:
    """(GB/s, how) of the faster plain streaming read of 512 MB: torch.sum, or the C loop with one slice per thread
    (ctypes releases the GIL, so the slices are read at once)."""
    clock = time.process_time if threads == 1 else time.perf_counter  # see timed()
    big = torch.ones(128 << 20)
    big.sum()
    best = {"torch.sum": 0.0}
    times = []
    for _ in range(reps):
        t = clock()
        big.sum()
        times.append(clock() - t)
    best["torch.sum"] = big.numel() * 4 / min(times) / 1e9
    read = _c_reader()
    if read is not None:
        step = big.numel() // threads
        parts = [(big.data_ptr() + i * step * 4, step) for i in range(threads)]
        times = []
        for _ in range(reps + 1):
            workers = [threading.Thread(target=read, args=part) for part in parts]
            t = clock()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            times.append(clock() - t)
        best["C read"] = step * threads * 4 / min(times[1:]) / 1e9
    how = max(best, key=best.get)
    return best[how], ", ".join(f"{k} {v:.1f}" for k, v in best.items())


def timed(calls, reps: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) per call, cycling through `calls` (one per weight copy)."""
    for fn in calls:
        fn()
    wall, cpu = [], []
    for i in range(reps):
        fn = calls[i % len(calls)]
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


# -- kernel families: each returns [(label, bytes read per call, [callables], optional [torch callables])] for (N, K)
# and `rows` ------------------------------------------------------------------------------------------------------
def dense_cases(n: int, k: int, rows: int):
    from loom.kernels import ops

    out = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        nbytes = n * k * dtype.itemsize
        weights = [torch.randn(n, k).to(dtype) for _ in range(max(1, COPIES_BYTES // nbytes))]
        x = torch.randn(rows, k).to(dtype)
        out.append((f"dense {name}", nbytes, [lambda w=w, x=x: ops.dense_linear(x, w, None) for w in weights],
                    [lambda w=w, x=x: F.linear(x, w) for w in weights]))
    return out
def int8_cases(n: int, k: int, rows: int):
    from loom.kernels import ops
    from loom.quantization.linear import quantize_int8

    q, s = quantize_int8(torch.randn(n, k))
    nbytes = n * k + n * 4
    copies = [(q.clone(), s.clone()) for _ in range(max(1, COPIES_BYTES // nbytes))]
    x = torch.randn(rows, k)
    return [("int8", nbytes, [lambda w=w, s=s: ops.int8_linear(x, w, s) for w, s in copies])]


def int4_cases(n: int, k: int, rows: int, group: int = 32):
    from loom.quantization.linear import Int4Linear

    lin = torch.nn.Linear(k, n, bias=False)
    nbytes = n * k // 2 + 2 * 2 * n * (k // group)
    mods = [Int4Linear.from_linear(lin, group) for _ in range(max(1, COPIES_BYTES // nbytes))]
    x = torch.randn(rows, k)
    return [("int4 g32 asym", nbytes, [lambda m=m: m(x) for m in mods])]


FAMILIES = {"dense": dense_cases, "int8": int8_cases, "int4": int4_cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(FAMILIES))
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    from loom.kernels import build

    print(f"loom kernels: {build.describe()}; torch {torch.__version__}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        bw, how = read_bandwidth(threads)
        print(f"\n## {threads} thread(s): measured read bandwidth {bw:.1f} GB/s ({how})")
        print("| kernel | shape | rows | us/call | GB/s | share of bandwidth | CPU us/call | torch us/call |")
        print("|---|---|---|---|---|---|---|---|")
        with torch.inference_mode():
            for family in args.kernels.split(","):
                for shape, (n, k) in SHAPES.items():
                    for rows in (int(r) for r in args.rows.split(",")):
                        for label, nbytes, calls, *torch_calls in FAMILIES[family](n, k, rows):
                            wall, cpu = timed(calls, args.reps)
                            per = cpu if threads == 1 else wall
                            ref = "-"
                            if torch_calls:  # torch's product right after loom's, under about the same machine load
                                ref = f"{timed(torch_calls[0], args.reps)[threads == 1] * 1e6:.0f}"
                            print(f"| {label} | {shape} | {rows} | {wall * 1e6:.0f} | {nbytes / per / 1e9:.1f} | "
                                  f"{nbytes / per / 1e9 / bw:.0%} | {cpu * 1e6:.0f} | {ref} |", flush=True)


if __name__ == "__main__":
    main()
