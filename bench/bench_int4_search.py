"""The asymmetric int4 search (integer zero points) on the ~145M bench checkpoint's 84 Linear weights (bench_prequant's
fp32 checkpoint, made there if missing): loom's C operator against its torch reference, which is the search loom ran
before (both give the same bits; checked here), then quantize-on-load (`from_pretrained(...,
quantization_config=WeightOnlyConfig(bits=4))`) with the kernels on and off, each load in its own process.

    .venv/bin/python bench/bench_int4_search.py [--rounds 3] [--group 32] [--threads 1] [--root DIR]

CPU seconds (`time.process_time`) on --threads threads, C and torch alternating round by round; each number is the
best over rounds. With one thread the CPU time is the steadier number on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def search_times(path: Path, group: int, rounds: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from loom.kernels import build, ops

    weights = [w for name, w in load_file(str(path / "model.safetensors")).items()
               if name.endswith("proj.weight")]
    same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for w in weights for a, b in
               zip(ops.int4_quantize_asymmetric(w, group), ops.int4_quantize_asymmetric_reference(w, group)))
    times = {"C": [], "torch": []}
    for _ in range(rounds):
        for name, fn in (("C", ops.int4_quantize_asymmetric), ("torch", ops.int4_quantize_asymmetric_reference)):
            start = time.process_time()
            for w in weights:
                fn(w, group)
            times[name].append(time.process_time() - start)
    return {"weights": len(weights), "values": sum(w.numel() for w in weights), "identical": same,
            "kernels": build.describe(), **{k: min(v) for k, v in times.items()}}


def load_child(path: str, group: int) -> None:
    import torch

    import loom
    from loom.quantization import WeightOnlyConfig

    start, wall = time.process_time(), time.perf_counter()
    loom.AutoModelForCausalLM.from_pretrained(path, quantization_config=WeightOnlyConfig(bits=4, group_size=group))
    print(json.dumps({"cpu": time.process_time() - start, "wall": time.perf_counter() - wall,
                      "threads": torch.get_num_threads()}))


def load_time(path: Path, group: int, threads: int, kernels: str) -> dict:
    env = {**os.environ, "LOOM_KERNELS": kernels, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--group", str(group)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default="/tmp/loom-bench-prequant", help="where bench_prequant keeps checkpoints")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        return load_child(args.child, args.group)
    from bench_prequant import make_format

    path = make_format(Path(args.root), "fp32")
    s = search_times(path, args.group, args.rounds)
    print(f"search, {s['weights']} weights ({s['values'] / 1e6:.1f}M values), group {args.group}, kernels "
          f"{s['kernels']}: C {s['C']:.2f} s, torch {s['torch']:.2f} s of CPU ({s['torch'] / s['C']:.1f}x); "
          f"identical bits: {s['identical']}")
    loads = {"on": [], "off": []}
    for _ in range(args.rounds):
        for kernels in loads:
            loads[kernels].append(load_time(path, args.group, args.threads, "auto" if kernels == "on" else "off"))
    on, off = (min(r["cpu"] for r in loads[k]) for k in ("on", "off"))
    print(f"quantize-on-load (from_pretrained, WeightOnlyConfig(bits=4, group_size={args.group})), "
          f"{args.threads} thread(s): kernels on {on:.2f} s, off (torch search) {off:.2f} s of CPU "
          f"(best of {args.rounds} rounds, alternating)")


if __name__ == "__main__":
    main()
