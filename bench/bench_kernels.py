"""loom's C kernels alone, against the memory they must read: GB/s streamed per kernel and its share of this
machine's measured read bandwidth (issue 22: decode kernels at >= 80% of the bandwidth floor).

    .venv/bin/python bench/bench_kernels.py [--kernels dense,int8,int4] [--rows 1,8] [--threads 1,2] [--reps 30]

The shapes are the bench checkpoint's Linears (bench/bench_generate.py: hidden 768, intermediate 2048, vocab 50257).
Each kernel runs on weights larger than the caches (several copies, cycled), so every call reads its weight from
memory. Times are medians; with --threads 1 the CPU time of this process is reported too (robust to a busy machine).
The bandwidth is that of a plain streaming read (torch.sum over a 512 MB fp32 tensor) on the same thread count.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {"qkvo 768x768": (768, 768), "up 2048x768": (2048, 768), "down 768x2048": (768, 2048),
          "head 50257x768": (50257, 768)}
COPIES_BYTES = 256 << 20  # cycle through at least this many bytes of weights


def read_bandwidth(reps: int = 5) -> float:
    """GB/s of a plain streaming read of 512 MB."""
    big = torch.ones(128 << 20)
    big.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t)
    return big.numel() * 4 / min(times) / 1e9


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


# -- kernel families: each returns [(label, bytes read per call, [callables])] for (N, K) and `rows` ---------------
def dense_cases(n: int, k: int, rows: int):
    from loom.kernels import ops

    out = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        nbytes = n * k * dtype.itemsize
        weights = [torch.randn(n, k).to(dtype) for _ in range(max(1, COPIES_BYTES // nbytes))]
        x = torch.randn(rows, k).to(dtype)
        out.append((f"dense {name}", nbytes, [lambda w=w: ops.dense_linear(x, w, None) for w in weights]))
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
        bw = read_bandwidth()
        print(f"\n## {threads} thread(s): measured read bandwidth {bw:.1f} GB/s")
        print("| kernel | shape | rows | us/call | GB/s | share of bandwidth | CPU us/call |")
        print("|---|---|---|---|---|---|---|")
        with torch.inference_mode():
            for family in args.kernels.split(","):
                for shape, (n, k) in SHAPES.items():
                    for rows in (int(r) for r in args.rows.split(",")):
                        for label, nbytes, calls in FAMILIES[family](n, k, rows):
                            wall, cpu = timed(calls, args.reps)
                            print(f"| {label} | {shape} | {rows} | {wall * 1e6:.0f} | {nbytes / wall / 1e9:.1f} | "
                                  f"{nbytes / wall / 1e9 / bw:.0%} | {cpu * 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
