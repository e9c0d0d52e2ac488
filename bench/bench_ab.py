"""A/B decode speed of two loom checkouts (e.g. before and after a kernel change) on the ~145M Llama-shaped bench
checkpoint, in alternating subprocesses so that load drifting on a shared machine hits both sides alike.

    .venv/bin/python bench/bench_ab.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [--tokens 64] [--threads 2]

Cases: fp32 and bf16 at batch 1 and 8, built-in int8 and int4 (WeightOnlyConfig defaults) at batch 1. The decode
rate excludes the prefill: (tokens - 1) / (time for `tokens` tokens - time for 1 token), each the best of 2 runs;
the table keeps each side's best round. It prints one row per case with both rates and new / old.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = [("fp32", 1), ("bf16", 1), ("fp32", 8), ("bf16", 8), ("int8", 1), ("int4", 1)]


def measure(ckpt: str, tokens: int, threads: int) -> dict[str, float]:
    """Runs inside a subprocess whose sys.path starts with the checkout under test."""
    import torch

    from loom import AutoModelForCausalLM, WeightOnlyConfig

    torch.set_num_threads(threads)
    out = {}
    for name, batch in CASES:
        kwargs = {"dtype": torch.bfloat16 if name == "bf16" else torch.float32}
        if name in ("int8", "int4"):
            kwargs["quantization_config"] = WeightOnlyConfig(bits=int(name[-1]))
        model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
        ids = torch.randint(3, 1000, (batch, 32), generator=torch.Generator().manual_seed(0))

        def run(n):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            return time.perf_counter() - t

        run(4)
        first = min(run(1) for _ in range(2))
        whole = min(run(tokens) for _ in range(2))
        out[f"{name} b{batch}"] = batch * (tokens - 1) / (whole - first)
        del model
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--_measure", default=None)
    args = parser.parse_args()
    if args._measure:
        print("RESULT " + json.dumps(measure(args._measure, args.tokens, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, os.path.dirname(__file__))
        from bench_generate import build_checkpoint

        build_checkpoint(tmp)
        best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
        for r in range(args.rounds):
            for side in ("old", "new"):
                path = os.path.abspath(getattr(args, side))
                proc = subprocess.run([sys.executable, __file__, args.old, args.new, "--tokens", str(args.tokens),
                                       "--threads", str(args.threads), "--_measure", tmp],
                                      capture_output=True, text=True, cwd=path,
                                      env={**os.environ, "PYTHONPATH": path})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{side} ({path}) failed:\n{proc.stderr[-3000:]}")
                for case, rate in json.loads(line[7:]).items():
                    best[side][case] = max(best[side].get(case, 0.0), rate)
                print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:.1f}" for k, v in json.loads(line[7:]).items()),
                      flush=True)
        print(f"\n| case | old tok/s | new tok/s | new / old |\n|---|---|---|---|")
        for case in best["old"]:
            o, n = best["old"][case], best["new"][case]
            print(f"| {case} | {o:.1f} | {n:.1f} | {n / o:.3f} |")


if __name__ == "__main__":
    main()
