"""Greedy generation, loom vs the reference, side by side on one random ~145M Llama-shaped checkpoint.

    .venv/bin/python bench/bench_generate.py [--new-tokens 96] [--reps 3] [--dtypes fp32,bf16] [--batches 1,8]

For each dtype and batch size it prints tokens/s and time to first token for both libraries, and the kernel floor:
the model's own Linear weights (85 of them) replayed alone as matrix-vector (batch 1) or skinny matrix (batch 8)
products in the same dtype with F.linear, i.e. the time a decode step would take with zero overhead around the
matmuls; and a second floor with the same weights replayed through the kernel loom's models actually call
(`loom.kernels.KernelLinear`: loom::dense_linear for up to 16 rows on x86-64 with AVX2). The decode rate excludes the
prefill (tokens after the first / time after the first token); both floors are compared with it. "same tokens" is the
number of leading greedy tokens (of 16) on which loom and the reference agree in every row: in fp32 all 16; in bf16
the two libraries round differently summed products (loom's kernel sums in another order), and on a random model,
whose logits are nearly tied, a 1-ulp difference can flip an argmax.
Times are the best of --reps runs (the machine is shared and noisy; the best run is the least disturbed one); times
to first token are the best of 2 * --reps, taken alternately for the two libraries.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CONFIG = dict(vocab_size=50257, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_checkpoint(directory: str) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.save_pretrained(directory)
    n = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: {n / 1e6:.0f}M parameters, {CONFIG}")


def best_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def kernel_floor(model, batch: int, dtype, reps: int, kernel: str = "F.linear") -> tuple[float, int]:
    """Seconds per decode step for the model's Linear layers alone, nothing else around them.

    kernel="F.linear" is the issue's floor (x @ W.T per layer); kernel="loom" calls the model's own Linears, which
    loom gives its fast path (`loom.kernels.KernelLinear`: loom::dense_linear, or W @ x.T).
    """
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(batch, m.in_features, dtype=dtype) for m in modules}
    if kernel == "loom":
        def step():
            for m in modules:
                m(xs[m.in_features])
    else:
        weights = [m.weight.detach() for m in modules]
        linear = torch.nn.functional.linear

        def step():
            for w in weights:
                linear(xs[w.shape[1]], w)

    with torch.inference_mode():
        for _ in range(3):
            step()
        return best_time(lambda: [step() for _ in range(10)], reps) / 10, len(modules)


def _generate(model, ids, n: int) -> None:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + n


def time_generate(model, ids, new_tokens: int, reps: int) -> float:
    """Best total seconds for new_tokens tokens."""
    _generate(model, ids, 4)  # warm-up
    return best_time(lambda: _generate(model, ids, new_tokens), reps)


def time_first_tokens(ours, ref, ids, reps: int) -> tuple[float, float]:
    """Best time to first token of each library, the two measured alternately (2 * reps each), so that load drifting
    during the run does not favour whichever library went first."""
    best = [float("inf"), float("inf")]
    for _ in range(2 * reps):
        for i, model in enumerate((ours, ref)):
            best[i] = min(best[i], best_time(lambda: _generate(model, ids, 1), 1))
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    import loom

    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"prompt {args.prompt}, new tokens {args.new_tokens}, best of {args.reps}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        build_checkpoint(d)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            ours = loom.AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
            ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
            for batch in map(int, args.batches.split(",")):
                g = torch.Generator().manual_seed(batch)
                ids = torch.randint(3, CONFIG["vocab_size"], (batch, args.prompt), generator=g)
                with torch.inference_mode():
                    a = ours.generate(ids, max_new_tokens=16, eos_token_id=None)[:, args.prompt:]
                    b = ref.generate(ids, max_new_tokens=16, eos_token_id=None, pad_token_id=0)[:, args.prompt:]
                    differ = (a != b).any(0).nonzero()
                    same = int(differ[0]) if len(differ) else 16
                floor, n_linear = kernel_floor(ours, batch, dtype, args.reps)
                kfloor, _ = kernel_floor(ours, batch, dtype, args.reps, kernel="loom")
                lt = time_generate(ours, ids, args.new_tokens, args.reps)
                rt = time_generate(ref, ids, args.new_tokens, args.reps)
                lf, rf = time_first_tokens(ours, ref, ids, args.reps)
                # again: load drifts during the run
                floor = min(floor, kernel_floor(ours, batch, dtype, args.reps)[0])
                kfloor = min(kfloor, kernel_floor(ours, batch, dtype, args.reps, kernel="loom")[0])
                n = args.new_tokens
                rows.append(dict(
                    dtype=dname, batch=batch, same_tokens=same, n_linear=n_linear,
                    floor=batch / floor, kfloor=batch / kfloor,
                    loom=batch * n / lt, ref=batch * n / rt,
                    loom_dec=batch * (n - 1) / (lt - lf), ref_dec=batch * (n - 1) / (rt - rf),
                    loom_ttft=lf * 1e3, ref_ttft=rf * 1e3))
                r = rows[-1]
                print(f"{dname} batch {batch}: floor {r['floor']:.1f} tok/s ({n_linear} Linears), loom-kernel floor "
                      f"{r['kfloor']:.1f} | loom "
                      f"{r['loom']:.1f} tok/s (decode {r['loom_dec']:.1f} = {r['loom_dec'] / r['floor']:.0%} of floor)"
                      f", ttft {r['loom_ttft']:.0f} ms | ref {r['ref']:.1f} tok/s (decode {r['ref_dec']:.1f} = "
                      f"{r['ref_dec'] / r['floor']:.0%}), ttft {r['ref_ttft']:.0f} ms | loom/ref "
                      f"{r['loom'] / r['ref']:.2f}x | same leading greedy tokens: {same}/16", flush=True)
            del ours, ref

    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("| dtype | batch | floor tok/s | loom-kernel floor tok/s | loom tok/s | ref tok/s | loom/ref | "
          "loom decode / floor | loom decode / loom-kernel floor | ref decode / floor | loom TTFT ms | ref TTFT ms | "
          "same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['batch']} | {r['floor']:.1f} | {r['kfloor']:.1f} | {r['loom']:.1f} | "
              f"{r['ref']:.1f} | {r['loom'] / r['ref']:.2f}x | {r['loom_dec'] / r['floor']:.0%} | "
              f"{r['loom_dec'] / r['kfloor']:.0%} | {r['ref_dec'] / r['floor']:.0%} | "
              f"{r['loom_ttft']:.0f} | {r['ref_ttft']:.0f} | {r['same_tokens']}/16 |")


if __name__ == "__main__":
    main()
