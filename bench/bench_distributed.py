"""Distributed training throughput and per-rank memory of a small Llama, launched torchrun-style on this machine.

    .venv/bin/python bench/bench_distributed.py [--steps 8] [--worlds 1 2 4]

For each world size N (same global batch): training tokens/s with FSDP2 and with replicated data parallel, and each
rank's parameter + optimizer-state bytes (FSDP should hold about 1/N of the replicated figure). The reference library
has no CPU/gloo multi-process training path of its own to run beside it (it delegates to accelerate/torchrun), so the
ratios printed are against loom's own single process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
SEQ, GLOBAL_BATCH = 128, 8


def worker(out: Path, steps: int, fsdp: bool) -> None:
    import torch

    from loom.distributed import setup_parallel
    from loom.models.llama import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    ctx = setup_parallel(fsdp=fsdp)
    torch.manual_seed(0)
    model = ctx.wrap_model(LlamaForCausalLM(LlamaConfig(**CONFIG)).train())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    micro = GLOBAL_BATCH // ctx.dp_size
    g = torch.Generator().manual_seed(ctx.dp_rank)
    batches = [torch.randint(0, CONFIG["vocab_size"], (micro, SEQ), generator=g) for _ in range(steps + 2)]
    times = []
    for i, ids in enumerate(batches):
        start = time.perf_counter()
        ctx.train_step(model, opt, [{"input_ids": ids, "labels": ids}], max_grad_norm=1.0)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local_bytes(p) for p in model.parameters())
    optim = sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    if ctx.rank == 0:
        tokens = GLOBAL_BATCH * SEQ * len(times)
        out.write_text(json.dumps({"tokens_per_s": tokens / sum(times), "param_bytes": params, "optim_bytes": optim}))


def launch(world: int, steps: int, fsdp: bool) -> dict:
    from loom.distributed.launch import check_ranks, launch_local

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        results = launch_local(world, [__file__, "--worker", out, steps, "fsdp" if fsdp else "replicate"],
                               env={"PYTHONPATH": str(ROOT)}, timeout=900)
        check_ranks(results, f"the {world}-process run")
        return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "fsdp")
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(f"Llama {CONFIG}, seq {SEQ}, global batch {GLOBAL_BATCH}, {args.steps} timed steps, {os.cpu_count()} CPUs")
    rows, base = [], None
    for world in args.worlds:
        for fsdp in ([False] if world == 1 else [True, False]):
            r = launch(world, args.steps, fsdp)
            base = base or r
            mode = "single" if world == 1 else "fsdp" if fsdp else "replicate"
            rows.append((world, mode, r["tokens_per_s"], r["tokens_per_s"] / base["tokens_per_s"],
                         (r["param_bytes"] + r["optim_bytes"]) / 2**20,
                         (base["param_bytes"] + base["optim_bytes"]) / (r["param_bytes"] + r["optim_bytes"])))
    print("| processes | mode | tokens/s | vs 1 process | params+optimizer MiB per rank | memory fall vs 1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for world, mode, tps, ratio, mib, fall in rows:
        print(f"| {world} | {mode} | {tps:.0f} | {ratio:.2f}x | {mib:.2f} | {fall:.2f}x |")


if __name__ == "__main__":
    main()
