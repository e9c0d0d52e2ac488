"""8-bit vs 4-bit vs bf16 vs fp32: weight memory, speed and accuracy on the real all-MiniLM-L6-v2.

    python docs/heuristics/quantization.py [--tiny] [--out DIR]

Each format loads the checkpoint in its own process through `from_pretrained(dtype=... | quantization_config=...)`
and embeds the same sentences (mean pooling, batch 32, one thread). Memory is the bytes of the model's weights and
quantization scales; speed is sentences per CPU-second (process time of a one-thread process, which other load on
a shared machine does not distort); accuracy is the cosine similarity of each sentence embedding to the fp32 one,
and whether semantic search (each query's nearest sentence among the examples) picks the same
sentence as fp32. bitsandbytes runs are included when bitsandbytes imports.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from _common import (ROOT, environment_note, one_thread, parse_args, pyplot, run_worker, save, run_script)

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DATA = ROOT / "examples" / "data"
FULL = dict(texts=400, repeats=3, formats=["fp32", "bf16", "int8", "int4", "bnb-8bit", "bnb-4bit"])
TINY = dict(texts=16, repeats=1, formats=["fp32", "int8"])


def texts(n: int) -> list[str]:
    rows = [json.loads(line)["text"] for line in (DATA / "sentiment.jsonl").read_text().splitlines()]
    return ((DATA / "sentences.txt").read_text().splitlines() + rows)[:n]


def load(fmt: str):
    import torch

    from loom import AutoModel, BitsAndBytesConfig, WeightOnlyConfig

    kwargs = {"fp32": {}, "bf16": {"dtype": torch.bfloat16},
              "int8": {"quantization_config": WeightOnlyConfig(bits=8)},
              "int4": {"quantization_config": WeightOnlyConfig(bits=4)},
              "bnb-8bit": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)},
              "bnb-4bit": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                     bnb_4bit_compute_dtype=torch.float32)}}[fmt]
    return AutoModel.from_pretrained(MODEL, **kwargs)


def embed(model, tokenizer, sentences: list[str]):
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), 32):
            enc = tokenizer(sentences[i:i + 32], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def worker(p: dict) -> dict:
    import torch

    from loom import AutoTokenizer

    one_thread()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    start = time.perf_counter()
    model = load(p["format"])
    load_s = time.perf_counter() - start
    sentences = texts(p["texts"])
    embed(model, tokenizer, sentences[:32])  # warm-up
    times = []
    for _ in range(p["repeats"]):
        start = time.process_time()  # CPU time of this one-thread process: immune to other users of the machine
        vectors = embed(model, tokenizer, sentences)
        times.append(time.process_time() - start)
    queries = embed(model, tokenizer, (DATA / "queries.txt").read_text().splitlines())
    torch.save({"vectors": vectors, "queries": queries}, p["save"])
    return {"weight_mib": weight_bytes(model) / 2**20, "load_s": load_s,
            "sentences_per_s": len(sentences) / min(times)}


def available(fmt: str) -> bool:
    if not fmt.startswith("bnb"):
        return True
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # missing or broken install: measure the built-in formats only
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(__doc__.splitlines()[0], argv)
    s = TINY if args.tiny else FULL
    rows = []
    n_sentences = len((DATA / "sentences.txt").read_text().splitlines())
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in [f for f in s["formats"] if available(f)]:
            path = str(Path(tmp) / f"{fmt}.pt")
            r = run_worker(__file__, {"format": fmt, "save": path, **s}, inline=worker if args.tiny else None)
            saved = torch.load(path)
            rows.append({"format": fmt, **r, "_vectors": saved["vectors"], "_queries": saved["queries"]})
    ref_vectors, ref_queries = rows[0]["_vectors"], rows[0]["_queries"]
    ref_pick = (ref_queries @ ref_vectors[:n_sentences].T).argmax(1)
    for r in rows:
        cos = (r["_vectors"] * ref_vectors).sum(1)
        r["mean_cosine_to_fp32"] = cos.mean().item()
        r["min_cosine_to_fp32"] = cos.min().item()
        pick = (r.pop("_queries") @ r.pop("_vectors")[:n_sentences].T).argmax(1)
        r["search_agreement"] = (pick == ref_pick).float().mean().item()
        print(r)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    names = [r["format"] for r in rows]
    for ax, key, label in ((axes[0], "weight_mib", "weights + scales (MiB)"),
                           (axes[1], "sentences_per_s", "sentences per CPU-second (batch 32)"),
                           (axes[2], "mean_cosine_to_fp32", "mean cosine to fp32 embedding")):
        ax.bar(names, [r[key] for r in rows], color=["#888", "#4a7", "#47a", "#a74", "#5ad", "#d85"][:len(rows)])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        for i, r in enumerate(rows):
            ax.annotate(f"{r[key]:.4f}" if key.startswith("mean") else f"{r[key]:.0f}", (i, r[key]), ha="center",
                        va="bottom", fontsize=7)
    axes[2].set_ylim(min(r["mean_cosine_to_fp32"] for r in rows) - 0.01, 1.001)
    fig.suptitle(f"all-MiniLM-L6-v2 (22.7M parameters), {s['texts']} sentences, 1 torch thread — "
                 f"{environment_note()}",
                 fontsize=8)
    save(fig, "quantization", args.out, {"settings": s, "rows": rows})


if __name__ == "__main__":
    run_script(main, worker)
