"""Quantization benchmark: load time, resident memory and batch-1 greedy decode tokens/s on a ~145M Llama-shaped
checkpoint, for loom fp32 / bf16 / int8 / int4 / bitsandbytes 8-bit and 4-bit and the reference's bitsandbytes
paths, plus all-MiniLM-L6-v2 embedding cosine similarity to fp32. Each variant runs in its own process so load
time and memory are its own.

The default checkpoint ties lm_head to the embeddings, which the quantizers keep in float (the issue's skip rule),
so every decode step still reads the 154 MB fp32 head. The "(untied)" rows use the same weights saved with an
untied head and quantize it too (`WeightOnlyConfig(skip_output_embeddings=False)`), showing the kernels' speed.

    .venv/bin/python bench/bench_quantization.py [--tokens 32] [--reps 2] [--layers 12] [--threads 2] [--only NAME ...]

Decode tok/s is `generate`'s rate after the first token (greedy, batch 1, the prefill excluded), best of --reps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name: (library, quantization, dtype, checkpoint)
    "loom fp32": ("loom", None, "float32", "tied"),
    "loom bf16": ("loom", None, "bfloat16", "tied"),
    "loom int8 (built-in)": ("loom", "int8", "float32", "tied"),
    "loom int4 (built-in)": ("loom", "int4", "float32", "tied"),
    "loom fp32 (untied)": ("loom", None, "float32", "untied"),
    "loom int8 + lm_head (untied)": ("loom", "int8-head", "float32", "untied"),
    "loom int4 + lm_head (untied)": ("loom", "int4-head", "float32", "untied"),
    "loom bnb 8-bit": ("loom", "bnb-8bit", "float32", "tied"),
    "loom bnb 4-bit nf4": ("loom", "bnb-4bit", "float32", "tied"),
    "reference bnb 8-bit": ("reference", "bnb-8bit", "float32", "tied"),
    "reference bnb 4-bit nf4": ("reference", "bnb-4bit", "float32", "tied"),
}
SENTENCES = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.",
             "Quantization shrinks a model's memory footprint.", "I would like a pizza with extra cheese.",
             "The stock market fell sharply on Monday morning.", "How do I reset my password?",
             "Photosynthesis converts light into chemical energy.", "She played the violin at the concert.",
             "The train to Berlin leaves at nine.", "Rain is expected for the whole weekend."]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_checkpoints(root: Path, layers: int) -> None:
    """root/tied (the benchmark model) and root/untied (the same weights with the head saved separately)."""
    import torch

    import loom

    config = loom.LlamaConfig(vocab_size=50257, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                              num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                              tie_word_embeddings=True)
    torch.manual_seed(0)
    model = loom.LlamaForCausalLM(config)
    model.save_pretrained(root / "tied")
    print(f"checkpoint: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters at {root}", flush=True)
    config.tie_word_embeddings = False
    untied = loom.LlamaForCausalLM(config)
    untied.load_state_dict({**model.state_dict(), "lm_head.weight": model.lm_head.weight.detach().clone()})
    untied.save_pretrained(root / "untied")


def quant_config(lib: str, flag: str | None):
    if flag is None:
        return None
    if lib == "loom":
        from loom.quantization import WeightOnlyConfig, config_from_flag

        if flag.endswith("-head"):
            return WeightOnlyConfig(bits=int(flag[3]), skip_output_embeddings=False)
        return config_from_flag(flag)
    import transformers

    if flag == "bnb-8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


def run_variant(name: str, path: str, tokens: int, reps: int) -> dict:
    """One variant, in this (fresh) process: load, then greedy `generate` (KV cache, batch 1)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    lib, flag, dtype, checkpoint = VARIANTS[name]
    path = str(Path(path) / checkpoint)
    before = rss_mb()
    start = time.perf_counter()
    if lib == "loom":
        import loom

        model = loom.LlamaForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant_config(lib, flag))
        cache_cls = loom.DynamicCache
    else:
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                              quantization_config=quant_config(lib, flag))
        cache_cls = transformers.DynamicCache
    load_s = time.perf_counter() - start
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 29889, 13]])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    generate(2)  # warm up (packs weights, allocator)
    # decode rate: the tokens after the first over the time after the first token (prefill excluded), best of reps
    total = min(generate(tokens) for _ in range(reps))
    first = min(generate(1) for _ in range(reps))
    tok_s = (tokens - 1) / (total - first)
    # after decoding every weight page has been touched (safetensors loads are memory-mapped until then)
    return {"load_s": load_s, "rss_mb": rss_mb() - before, "tok_s": tok_s}


def minilm_cosines() -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    import loom
    from loom.hub import packaged_model_dir
    from loom.quantization import config_from_flag

    path = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    tok = transformers.AutoTokenizer.from_pretrained(path)  # the bench may use the oracle's tokenizer
    enc = tok(SENTENCES, padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    ref = embed(loom.AutoModel.from_pretrained(path))
    out = {}
    for flag in ("int8", "int4", "bnb-8bit", "bnb-4bit"):
        cos = (embed(loom.AutoModel.from_pretrained(path, quantization_config=config_from_flag(flag))) * ref).sum(-1)
        out[flag] = (cos.mean().item(), cos.min().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2, help="decode timings are the best of this many runs")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM accuracy table")
    parser.add_argument("--_variant", default=None)
    parser.add_argument("--_path", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args._variant:
        print(json.dumps(run_variant(args._variant, args._path, args.tokens, args.reps)))
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoints(Path(tmp), args.layers)
        rows = {}
        for name in args.only or VARIANTS:
            proc = subprocess.run([sys.executable, __file__, "--_variant", name, "--_path", tmp, "--tokens",
                                   str(args.tokens), "--reps", str(args.reps), "--threads", str(args.threads)],
                                  env=env, capture_output=True, text=True)
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            try:
                rows[name] = json.loads(last)
            except json.JSONDecodeError:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                continue
            r = rows[name]
            print(f"{name}: load {r['load_s']:.2f}s, +{r['rss_mb']:.0f} MB, {r['tok_s']:.1f} tok/s", flush=True)
    base = rows.get("loom fp32")
    print("\n| variant | load s | resident MB after decode | decode tok/s | vs loom fp32 |\n| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        print(f"| {name} | {r['load_s']:.2f} | {r['rss_mb']:.0f} | {r['tok_s']:.1f} | {ratio} |")
    for lib in ("8-bit", "4-bit nf4"):
        a, b = rows.get(f"loom bnb {lib}"), rows.get(f"reference bnb {lib}")
        if a and b:
            print(f"loom / reference bnb {lib} decode: {a['tok_s'] / b['tok_s']:.2f}x, load: "
                  f"{b['load_s'] / a['load_s']:.2f}x faster")
    if args.no_minilm:
        return
    print("\n| MiniLM embeddings | mean cosine to fp32 | min |\n| --- | --- | --- |")
    for flag, (mean, low) in minilm_cosines().items():
        print(f"| {flag} | {mean:.4f} | {low:.4f} |")


if __name__ == "__main__":
    main()
