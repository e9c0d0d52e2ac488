"""Pre-quantized checkpoints, loom vs the reference, on the ~145M Llama-shaped bench checkpoint (bench_generate's
`build_checkpoint`: hidden 768, 12 layers, untied head) converted to each format loom writes or this script packs
offline: load time, resident memory and batch-1 greedy decode tokens/s.

    .venv/bin/python bench/bench_prequant.py [--tokens 24] [--reps 2] [--rounds 1] [--threads 1] [--only FMT ...]
                                             [--root DIR]

Formats (each a directory under --root, made once and reused):
  fp32            the float checkpoint itself (the baseline)
  ct-int8         loom WeightOnlyConfig(bits=8) saved: compressed-tensors pack-quantized int8, per channel
  ct-int4         loom WeightOnlyConfig(bits=4) saved: pack-quantized int4, group 32, integer zero points
  ct-int4-sym128  loom WeightOnlyConfig(bits=4, group_size=128, symmetric=True): the common W4A16 scheme
  ct-int8-head    ct-int8 with lm_head quantized too (WeightOnlyConfig(..., skip_output_embeddings=False))
  ct-int4-head    ct-int4 with lm_head quantized too
  gptq-int4       GPTQ v1 (sym, group 128, no act-order), packed by hand as tests/quantization does
  gguf-q8_0       GGUF Q8_0 (the gguf package's quantizer; token_embd and norms F32, output Q8_0)
  gguf-q4_0       GGUF Q4_0 (the same, output Q4_0)

Every (library, format) pair runs in its own process (load time and memory are its own), loom and the reference
alternating format by format, `--rounds` times over; each number is the best over rounds. The reference loads
compressed-tensors with its own CPU path (asymmetric pack-quantized only with dequantize=True, see the quantization
guide), GGUF dequantized to fp32, and GPTQ not at all without gptqmodel (reported as such).
Decode tok/s is `generate`'s rate after the first token (prefill excluded), best of --reps, in wall-clock time and
per CPU-second (with one thread the CPU time is the steadier number on a shared machine); resident MB is the
process's RSS growth from before the load to after decoding.
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
from bench_quantization import rss_mb  # noqa: E402  (the benches share it)
FORMATS = ("fp32", "ct-int8", "ct-int4", "ct-int4-sym128", "ct-int8-head", "ct-int4-head", "gptq-int4",
           "gguf-q8_0", "gguf-q4_0")
LOOM_CONFIGS = {"ct-int8": dict(bits=8), "ct-int4": dict(bits=4), "ct-int4-sym128": dict(bits=4, group_size=128,
                symmetric=True), "ct-int8-head": dict(bits=8, skip_output_embeddings=False),
                "ct-int4-head": dict(bits=4, skip_output_embeddings=False)}


# -- making the checkpoints ------------------------------------------------------------------------------------------
def make_format(root: Path, fmt: str) -> Path:
    out = root / fmt
    if (out / "done").exists():
        return out
    src = root / "fp32"
    if fmt == "fp32":
        from bench_generate import build_checkpoint

        build_checkpoint(str(src))
    elif fmt in LOOM_CONFIGS:
        import loom
        from loom.quantization import WeightOnlyConfig

        model = loom.LlamaForCausalLM.from_pretrained(src, quantization_config=WeightOnlyConfig(**LOOM_CONFIGS[fmt]))
        model.save_pretrained(out)
    else:
        import transformers

        ref = transformers.LlamaForCausalLM.from_pretrained(src, dtype="float32")
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "quantization")]
        if fmt == "gptq-int4":
            from test_quant_gptq_awq import gptq_checkpoint

            gptq_checkpoint(ref, out, bits=4, group_size=128, sym=True)
        else:
            from ggufwrite import write_gguf

            out.mkdir(parents=True, exist_ok=True)
            write_gguf(out / "model.gguf", ref, "llama", fmt.split("-")[1].upper(), name="bench")
    (out / "done").write_text("")
    return out


# -- one measurement (in a fresh process) ------------------------------------------------------------------------------
def load(lib: str, fmt: str, path: Path):
    import torch

    kwargs = {"gguf_file": "model.gguf"} if fmt.startswith("gguf") else {}
    if lib == "loom":
        import loom

        return loom.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    import transformers

    if fmt in ("ct-int4", "ct-int4-head"):  # asymmetric pack-quantized: the reference's compressed path refuses it
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def measure(lib: str, fmt: str, path: Path, tokens: int, reps: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    before = rss_mb()
    start = time.perf_counter()
    model = load(lib, fmt, path).eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 29889, 13]])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def generate(n: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start, time.process_time() - cpu

    generate(2)  # warm up
    total = [generate(tokens) for _ in range(reps)]
    first = [generate(1) for _ in range(reps)]
    wall = min(t[0] for t in total) - min(t[0] for t in first)
    cpu = min(t[1] for t in total) - min(t[1] for t in first)
    return {"load_s": load_s, "rss_mb": rss_mb() - before, "tok_s": (tokens - 1) / wall,
            "tok_cpu_s": (tokens - 1) / cpu}


def run_one(lib: str, fmt: str, path: Path, args) -> dict | str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--_lib", lib, "--_fmt", fmt, "--_path", str(path), "--tokens",
           str(args.tokens), "--reps", str(args.reps), "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"over {args.timeout}s"
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return "does not load: " + (err[-1][:160] if err else f"exit {proc.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved passes over every (library, format)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--only", nargs="*", default=None, choices=FORMATS)
    parser.add_argument("--root", default="/tmp/loom-bench-prequant", help="where the converted checkpoints live")
    parser.add_argument("--_lib")
    parser.add_argument("--_fmt")
    parser.add_argument("--_path")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args._lib:
        print(json.dumps(measure(args._lib, args._fmt, Path(args._path), args.tokens, args.reps)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    root = Path(args.root)
    formats = args.only or FORMATS
    paths = {fmt: make_format(root, fmt) for fmt in ("fp32", *formats)}
    best: dict[tuple[str, str], dict | str] = {}
    for _ in range(args.rounds):
        for fmt in formats:
            for lib in ("loom", "reference"):
                r = run_one(lib, fmt, paths[fmt], args)
                old = best.get((lib, fmt))
                if isinstance(r, dict) and isinstance(old, dict):
                    r = {k: (min if k in ("load_s", "rss_mb") else max)(r[k], old[k]) for k in r}
                best[(lib, fmt)] = r if isinstance(r, dict) or old is None else old
                shown = r if isinstance(r, str) else f"load {r['load_s']:.2f}s, +{r['rss_mb']:.0f} MB, " \
                    f"{r['tok_s']:.2f} tok/s, {r['tok_cpu_s']:.2f} tok/CPU-s"
                print(f"{lib} {fmt}: {shown}", flush=True)
    print(f"\n{args.threads} thread(s), {args.tokens} new tokens, best of {args.reps} reps x {args.rounds} rounds")
    print("| format | loom load s | loom MB | loom tok/s (per CPU-s) | ref load s | ref MB | ref tok/s (per CPU-s) "
          "| decode loom/ref (CPU) | loom vs loom fp32 (CPU) |\n|" + " --- |" * 9)
    base = best.get(("loom", "fp32"))

    def ratio(a, b) -> str:
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return "-"
        return f"{a['tok_s'] / b['tok_s']:.2f}x ({a['tok_cpu_s'] / b['tok_cpu_s']:.2f}x)"

    for fmt in formats:
        a, b = best.get(("loom", fmt)), best.get(("reference", fmt))
        cells = []
        for r in (a, b):
            cells += [f"{r['load_s']:.2f}", f"{r['rss_mb']:.0f}", f"{r['tok_s']:.2f} ({r['tok_cpu_s']:.2f})"] \
                if isinstance(r, dict) else [r or "-", "", ""]
        print(f"| {fmt} | {' | '.join(cells)} | {ratio(a, b)} | {ratio(a, base)} |")


if __name__ == "__main__":
    main()
