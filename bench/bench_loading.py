"""Loading benchmark: cold start (fresh process: import, from_pretrained, logits for 8 tokens), warm load, import cost.

loom and the reference run alternately in one run on the same ~145M-parameter Llama-shaped fp32 checkpoint (made here
with random weights), page cache warm. Prints a table of medians and loom/reference ratios.

    .venv/bin/python bench/bench_loading.py [--repeats 5] [--workdir bench/_work]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_145M = dict(vocab_size=50257, hidden_size=768, intermediate_size=1792, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=False)

COLD = """
import time, sys
t0 = time.perf_counter()
import torch
from {lib} import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r})
with torch.inference_mode():
    logits = model(torch.arange(8)[None] + 100).logits
t1 = time.perf_counter()
model2 = AutoModelForCausalLM.from_pretrained({path!r})
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, float(logits.float().abs().sum()))
"""

IMPORT = """
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import {lib}
missing = 0
for name in ("AutoModelForCausalLM", "AutoTokenizer", "pipeline", "Trainer"):
    try:
        getattr({lib}, name)
    except (ImportError, AttributeError):
        missing += 1
t2 = time.perf_counter()
print(t2 - t1, missing)
"""


def make_checkpoint(path: Path) -> None:
    if (path / "model.safetensors").exists():
        return
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import loom

    torch.manual_seed(0)
    model = loom.LlamaForCausalLM(loom.LlamaConfig(**LLAMA_145M))
    model.save_pretrained(path)


def run(code: str) -> tuple[list[float], float, float]:
    """Run `code` in a fresh interpreter; return its printed floats, wall seconds and peak RSS in MB."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if status != 0:
        raise RuntimeError(f"benchmark child failed:\n{err}")
    return [float(x) for x in out.split()], wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loom-bench-"))
    ckpt = workdir / "llama145m"
    make_checkpoint(ckpt)
    results = {lib: {"cold": [], "rss": [], "warm": [], "import": [], "check": []} for lib in ("loom", "transformers")}
    for _ in range(args.repeats):
        for lib in ("loom", "transformers"):
            (inner, warm, check), wall, rss = run(COLD.format(lib=lib, path=str(ckpt)))
            r = results[lib]
            r["cold"].append(wall - warm)  # whole process minus the second (warm) load it also did
            r["rss"].append(rss)
            r["warm"].append(warm)
            r["check"].append(check)
            (imp, missing), _, _ = run(IMPORT.format(lib=lib))
            if missing:
                raise SystemExit(f"{lib} lacks {int(missing)} of the public names the import benchmark touches")
            r["import"].append(imp)
    med = {lib: {k: statistics.median(v) for k, v in r.items()} for lib, r in results.items()}
    lo, ref = med["loom"], med["transformers"]
    rel = abs(lo["check"] - ref["check"]) / max(abs(ref["check"]), 1e-9)
    rows = [("cold start: import + from_pretrained + logits (s)", "cold", "<= 0.5"),
            ("peak RSS of that process (MB)", "rss", "<= 1.0"),
            ("warm from_pretrained in the same process (s)", "warm", "<= 1.0"),
            ("import cost over torch: Auto*, tokenizer, pipeline, Trainer (s)", "import", "loom <= 0.3 s")]
    print(f"checkpoint: {ckpt} ({sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) / 1e6:.0f} MB), "
          f"repeats={args.repeats}, logits |sum| relative difference loom vs reference: {rel:.2e}\n")
    print("| measure | loom | reference | loom / reference | target |")
    print("| --- | --- | --- | --- | --- |")
    for label, key, target in rows:
        print(f"| {label} | {lo[key]:.3f} | {ref[key]:.3f} | {lo[key] / ref[key]:.2f} | {target} |")
    print(json.dumps(med), file=sys.stderr)


if __name__ == "__main__":
    main()
