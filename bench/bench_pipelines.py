"""Text-classification pipeline throughput, loom vs the reference, on the same checkpoint and inputs.

2,000 sentences of mixed length (5-200 words, uniform), batch_size=16. The checkpoint is a BERT classifier over
the MiniLM vocabulary (30522 tokens): `--model small` (4 layers, hidden 256; default) is built randomly with the
reference, `--model minilm` puts a fresh two-label head on the real all-MiniLM-L6-v2 encoder.

    .venv/bin/python bench/bench_pipelines.py [--n 2000] [--batch-size 16] [--model small|minilm] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_checkpoint(kind: str, directory: Path) -> Path:
    import torch
    import transformers

    from loom.hub import packaged_model_dir

    transformers.logging.set_verbosity_error()
    minilm = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    torch.manual_seed(0)
    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    if kind == "minilm":
        model = transformers.BertForSequenceClassification.from_pretrained(minilm, id2label=labels,
                                                                           label2id={v: k for k, v in labels.items()})
    else:
        config = transformers.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=1024, max_position_embeddings=512, id2label=labels,
                                         label2id={v: k for k, v in labels.items()})
        model = transformers.BertForSequenceClassification(config)
    model.eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, directory / name)
    return directory


def make_sentences(n: int, seed: int = 0) -> list[str]:
    from loom.hub import packaged_model_dir

    vocab = (packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2") / "vocab.txt").read_text().split("\n")
    words = [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2]
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(5, 200))) + "." for _ in range(n)]


def timed(pipe, texts: list[str], batch_size: int, repeats: int) -> float:
    pipe(texts[:32], batch_size=batch_size)  # warm-up: first-call allocations, lazy imports
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(texts, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", choices=("small", "minilm"), default="small")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers

    import loom

    torch.set_num_threads(args.threads)
    texts = make_sentences(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(args.model, Path(tmp))
        ours = loom.pipeline("text-classification", model=str(path))
        ref = transformers.pipeline("text-classification", model=str(path), device="cpu", truncation=True,
                                    max_length=512)
        a, b = ours(texts[:64], batch_size=args.batch_size), ref(texts[:64], batch_size=args.batch_size)
        agree = sum(x["label"] == y["label"] and abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(a, b))
        t_ref = timed(ref, texts, args.batch_size, args.repeats)
        t_ours = timed(ours, texts, args.batch_size, args.repeats)
    print(f"text-classification, {args.n} sentences of 5-200 words, batch_size={args.batch_size}, model={args.model}, "
          f"torch threads={args.threads}; outputs agree on {agree}/64 checked inputs")
    print(f"| library | seconds (best of {args.repeats}) | texts/s |")
    print("| --- | --- | --- |")
    print(f"| transformers {transformers.__version__} | {t_ref:.2f} | {args.n / t_ref:.1f} |")
    print(f"| loom {loom.__version__} | {t_ours:.2f} | {args.n / t_ours:.1f} |")
    print(f"speed-up loom / reference: {t_ref / t_ours:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
