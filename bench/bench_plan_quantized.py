"""1-thread CPU time per decoded token of loom's quantized models, for A/B runs of two source trees (issue 22: the
decode plan over quantized layers).

    .venv/bin/python bench/bench_plan_quantized.py --checkpoint DIR [--gguf FILE] --trees OLD,NEW [--rounds 3]

DIR: a float32 Llama-shaped checkpoint (bench_llamacpp's / bench_prequant's bench checkpoint: hidden 768, 12 layers),
quantized at load as int8 incl. head, int4 g32 symmetric incl. head and int4 g32 asymmetric (fp32 head); FILE: a
GGUF Q8_0 file of it (`gguf_file=`). Each (round, format, tree) runs in a fresh process with PYTHONPATH=tree, one
after the other (interleaved), 1 thread: greedy batch-1 generate from a 1-token prompt, CPU time per token between
the first and last token (the prefill excluded), best of 2 generates; the process also reports how many of an 8-token
generate's steps the decode plan ran and its last tokens (which must match between trees). Prints one JSON line per
run and a median table. Timed with process CPU time, so it reads on a busy machine too (the load average is shown).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FORMATS = {"int8+head": dict(bits=8, skip_output_embeddings=False),
           "int4+head": dict(bits=4, group_size=32, symmetric=True, skip_output_embeddings=False),
           "int4asym": dict(bits=4, group_size=32)}


def worker(checkpoint: str, gguf: str | None, fmt: str, tokens: int) -> None:
    import torch

    torch.set_num_threads(1)
    import loom
    from loom.quantization import WeightOnlyConfig

    if fmt == "q8_0":
        folder, name = os.path.split(gguf)
        model = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    else:
        model = loom.AutoModelForCausalLM.from_pretrained(checkpoint,
                                                          quantization_config=WeightOnlyConfig(**FORMATS[fmt]))
    model.eval()
    planned = [0]
    try:
        from loom.kernels.chain import DecodeChain

        run = DecodeChain.run

        def counted(self, *args):
            planned[0] += 1
            return run(self, *args)
        DecodeChain.run = counted
    except ImportError:
        pass

    class Clock:
        def __init__(self):
            self.cpu = []

        def put(self, value):
            self.cpu.append(time.process_time())

        def end(self):
            pass

    def generate(n, clock=None, seed=0):
        ids = torch.randint(3, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  streamer=clock)
    generate(4)
    per_token = []
    for rep in range(2):
        clock = Clock()
        out = generate(tokens, clock, rep)
        per_token.append((clock.cpu[-1] - clock.cpu[1]) / (tokens - 1) * 1e3)
    planned[0] = 0
    generate(8)
    print(json.dumps(dict(fmt=fmt, cpu_ms=min(per_token), all=per_token, planned_steps=planned[0],
                          tokens=out[0, -5:].tolist())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--gguf", default=None, help="a Q8_0 GGUF file of the checkpoint (adds the q8_0 format)")
    ap.add_argument("--trees", default=None, help="OLD,NEW: source trees (their loom/ is imported)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.checkpoint, args.gguf, args.worker, args.tokens)
    if not args.trees:
        ap.error("--trees OLD,NEW is required")
    trees = args.trees.split(",")
    formats = list(FORMATS) + (["q8_0"] if args.gguf else [])
    results: dict = {}
    for r in range(args.rounds):
        for fmt in formats:
            for tree in trees:
                load = open("/proc/loadavg").read().split()[0]
                cmd = [sys.executable, os.path.abspath(__file__), "--checkpoint", args.checkpoint, "--worker", fmt,
                       "--tokens", str(args.tokens)] + (["--gguf", args.gguf] if args.gguf else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tree})
                if proc.returncode:
                    sys.exit(proc.stderr[-2000:])
                reply = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps(dict(round=r + 1, tree=tree, load=load, **reply)), flush=True)
                results.setdefault((fmt, tree), []).append(reply["cpu_ms"])
    print(f"\n| 1 thread, CPU ms per token | {' | '.join(trees)} | {trees[0]} / {trees[-1]} |")
    print("|---|" + "---|" * (len(trees) + 1))
    for fmt in formats:
        meds = [statistics.median(results[(fmt, t)]) for t in trees]
        cells = [f"{' / '.join(f'{v:.2f}' for v in results[(fmt, t)])} (median {m:.2f})" for t, m in zip(trees, meds)]
        print(f"| {fmt} | {' | '.join(cells)} | {meds[0] / meds[-1]:.2f}x |")


if __name__ == "__main__":
    main()
