"""Compiled static-cache decode, loom vs the reference, on one random Llama-shaped checkpoint saved by the reference.

    .venv/bin/python bench/bench_compile.py [--tiny] [--new-tokens 64] [--prompt 32] [--reps 5] [--batch 1]

Three ways to decode greedily, same prompt, same token count, fp32:
- loom eager: `generate(...)` with its default dynamic cache (loom's C kernels where they apply);
- loom compiled: `generate(..., cache_implementation="static", compile=True)` (the prefill runs eagerly, the decode
  step is compiled once with inductor);
- reference compiled: `model.forward = torch.compile(model.forward)` and `generate(..., cache_implementation="static")`,
  the recipe of the reference's docs for CPU (its automatic `compile_config` path is GPU-only unless forced).
For each it prints the compile time (the first call's extra time over a warm call), the steady decode rate (tokens
after the first / the time after the first token, best of --reps alternating runs), how many graphs dynamo compiled, and whether the
tokens equal loom eager's. Inductor's caches point at a fresh temporary directory, so compile times are cold.
--tiny uses a 2-layer model and a few tokens: a smoke run in well under a minute.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

_CACHE = tempfile.mkdtemp(prefix="bench_compile_inductor_")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _CACHE)  # cold compiles: nothing reused from earlier runs
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CONFIGS = {
    # ~40M parameters: big enough that the matmuls matter, small enough to compile in a minute or two on 2 cores
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
}


def build_checkpoint(directory: str, config: dict) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(bos_token_id=1, eos_token_id=2,
                                                                   tie_word_embeddings=False, **config))
    model.save_pretrained(directory)
    print(f"checkpoint: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {config}")


def _frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def measure(name: str, generate, new_tokens: int, reps: int) -> dict:
    """First call (compiles, if anything does), then the steady decode rate from warm calls: the best time of
    new_tokens tokens minus the best time of one token (prefill + first token), the two timed alternately so that
    load drifting during the run (the machine is shared) does not favour either."""
    frames = _frames()
    start = time.perf_counter()
    tokens = generate(new_tokens)
    first = time.perf_counter() - start
    one = full = float("inf")
    for _ in range(reps):
        one = min(one, _timed(lambda: generate(1)))
        full = min(full, _timed(lambda: generate(new_tokens)))
    decode = tokens.shape[0] * (new_tokens - 1) / (full - one) if full > one else float("nan")
    row = dict(name=name, tokens=tokens, first=first, full=full, compile=max(first - full, 0.0), decode=decode,
               graphs=_frames() - frames)
    print(f"{name}: first call {first:.2f} s, warm call {full * 1e3:.1f} ms (of which prefill + 1 token "
          f"{one * 1e3:.1f} ms), decode {decode:.1f} tok/s, {row['graphs']} graph(s) compiled", flush=True)
    return row


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="2-layer model, few tokens: a quick smoke run")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    config = CONFIGS["tiny" if args.tiny else "small"]
    new_tokens = args.new_tokens or (16 if args.tiny else 64)
    prompt = args.prompt or (8 if args.tiny else 32)
    import transformers

    import loom

    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, prompt {prompt}, new tokens {new_tokens}, "
          f"best of {args.reps}")
    with tempfile.TemporaryDirectory() as d:
        build_checkpoint(d, config)
        ids = torch.randint(3, config["vocab_size"], (args.batch, prompt), generator=torch.Generator().manual_seed(0))
        ours = loom.AutoModelForCausalLM.from_pretrained(d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

        def loom_generate(n, **extra):
            with torch.inference_mode():
                return ours.generate(ids, max_new_tokens=n, **kw, **extra)[:, prompt:]

        def ref_generate(n):
            with torch.inference_mode():
                return ref.generate(ids, max_new_tokens=n, cache_implementation="static", **kw)[:, prompt:]

        torch._dynamo.reset()
        rows = [measure("loom eager (dynamic cache)", loom_generate, new_tokens, args.reps)]
        rows.append(measure("loom compiled (static cache)",
                            lambda n: loom_generate(n, cache_implementation="static", compile=True),
                            new_tokens, args.reps))
        torch._dynamo.reset()  # the reference compiles from scratch too
        ref.forward = torch.compile(ref.forward)
        rows.append(measure("reference compiled (static cache)", ref_generate, new_tokens, args.reps))

    eager, ref_row = rows[0], rows[2]
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("| variant | compile s | decode tok/s | / loom eager | / reference compiled | graphs compiled | "
          "same tokens as loom eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = int((r["tokens"] == eager["tokens"]).all(0).long().cumprod(0).sum())
        print(f"| {r['name']} | {r['compile']:.1f} | {r['decode']:.1f} | {r['decode'] / eager['decode']:.2f}x | "
              f"{r['decode'] / ref_row['decode']:.2f}x | {r['graphs']} | {same}/{new_tokens} |")


if __name__ == "__main__":
    main()
