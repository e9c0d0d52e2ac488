"""Decode speed of the newer decoder families, loom vs the reference, side by side in one process.

    .venv/bin/python bench/bench_families.py [--families qwen3,gemma3_text,mixtral] [--new-tokens 48] [--reps 3]
                                             [--dtypes fp32,bf16] [--batches 1,8] [--threads 2] [--cpu-time]

One random checkpoint per family, shaped like a ~100-150M-parameter release of it (Qwen3: q/k norms, head_dim 64;
Gemma 3: sliding/global layers, (1 + w) norms, GeLU; Mixtral-style MoE: 8 experts, top 2). For each dtype and batch
size: decode tokens/s of both libraries (the prefill excluded: tokens after the first / time after the first
token), best of --reps runs taken alternately. For MoE families it also prints the bandwidth floor of a batch-1
step: the bytes a step must read (every weight outside the experts, plus top_k / num_experts of the expert weights)
over the memory bandwidth measured here by summing a 1 GiB tensor, and loom's step time / that floor.
`--cpu-time` times with the process's CPU time instead of the wall clock: with `--threads 1` that is the work
itself, unaffected by other processes on a busy machine (the ratios then compare one core's worth of each library).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

COMMON = dict(vocab_size=32000, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
SHAPES = {
    "qwen3": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64),
    "gemma3_text": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=4, head_dim=64, sliding_window=512, tie_word_embeddings=True),
    "mixtral": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(model_type: str, directory: str) -> int:
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **SHAPES[model_type]})
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def decode_rate(model, ids, tokens: int, clock=time.perf_counter) -> float:
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        t = clock()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, **kw)
        return clock() - t

    return ids.shape[0] * (tokens - 1) / (run(tokens) - run(1))


def bandwidth() -> float:
    """Bytes per second that summing a 1 GiB fp32 tensor reads (best of 5)."""
    x = torch.ones(2**28)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def moe_step_bytes(model, element_size: int) -> float:
    """Bytes a batch-1 decode step reads: every weight except the experts' unused share (embedding rows aside)."""
    total = experts = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel()
        if ".experts." in name:
            experts += p.numel()
    cfg = model.config
    active = cfg.num_experts_per_tok / getattr(cfg, "num_local_experts", getattr(cfg, "num_experts", 1))
    return (total - experts * (1 - active)) * element_size


def main() -> None:
    import transformers

    import loom

    p = argparse.ArgumentParser()
    p.add_argument("--families", default="qwen3,gemma3_text,mixtral")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-time", action="store_true", help="time with process CPU time (use with --threads 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    bw = bandwidth()
    print(f"memory bandwidth (1 GiB sum): {bw / 1e9:.1f} GB/s, {args.threads} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time\n")
    print("| family | params | dtype | batch | loom tok/s | ref tok/s | loom/ref | loom step / MoE floor |")
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            n = build(family, tmp)
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                ours = loom.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
                ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
                for batch in (int(b) for b in args.batches.split(",")):
                    ids = torch.randint(3, 32000, (batch, 32), generator=torch.Generator().manual_seed(0))
                    a = b = 0.0
                    for _ in range(args.reps):  # alternate, keep each side's best
                        a = max(a, decode_rate(ours, ids, args.new_tokens, clock))
                        b = max(b, decode_rate(ref, ids, args.new_tokens, clock))
                    floor = ""
                    if batch == 1 and any(".experts." in name for name, _ in ours.named_parameters()):
                        step = 1 / a
                        floor = f"{step / (moe_step_bytes(ours, dtype.itemsize) / bw):.2f}x"
                    print(f"| {family} | {n / 1e6:.0f}M | {dname} | {batch} | {a:.1f} | {b:.1f} | {a / b:.2f}x | "
                          f"{floor} |", flush=True)
                del ours, ref


if __name__ == "__main__":
    main()
