"""Sentence-embedding throughput: loom's feature-extraction pipeline against sentence-transformers' `encode` and the
reference library (AutoModel + the folder's mean pooling, written out here), side by side in one process.

    .venv/bin/python bench/bench_embeddings.py [--models minilm,mpnet,xlm-roberta,modernbert] [--texts 2000]
                                               [--batch 32] [--dtypes fp32,bf16] [--threads 2]
                                               [--repeats 1] [--cpu-time]

minilm is the real all-MiniLM-L6-v2 folder; the others are random checkpoints shaped like the base-size release of
each family (12 layers, hidden 768), saved by the reference with the MiniLM tokenizer and a mean-pooling
sentence-transformers layout beside them. Texts: --texts sentences of 4 to 120 words, mixed lengths, fixed seed.
Prints texts/s for each side, the ratios, and the largest difference between loom's and sentence-transformers'
vectors. --repeats N runs the three sides in turn N times and keeps each side's best; --cpu-time times the process's
CPU time instead of wall time (for a busy machine, with --threads 1).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            vocab_size=30522, max_position_embeddings=514, pad_token_id=0)
SHAPES = {"mpnet": BASE, "xlm-roberta": {**BASE, "type_vocab_size": 1},
          "modernbert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1152,
                             vocab_size=30522, max_position_embeddings=512, pad_token_id=0)}
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def texts(n: int) -> list[str]:
    rng = random.Random(0)
    words = ("the a model search vector query document answer fast slow city river music language people data "
             "history science market energy garden window morning evening quickly carefully").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 120))) for _ in range(n)]


def folder(name: str, root: str) -> str:
    from loom.hub import packaged_model_dir

    minilm = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    if name == "minilm":
        return str(minilm)
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(name, **SHAPES[name]))
    path = os.path.join(root, name)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", *ST_FILES):
        if os.path.exists(os.path.join(minilm, f)):
            shutil.copy(os.path.join(minilm, f), path)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as fh:
        json.dump({"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True}, fh)
    with open(os.path.join(path, "modules.json"), "w") as fh:  # no Normalize: the raw mean
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], fh)
    return path


def reference_load(path, dtype):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path), transformers.AutoModel.from_pretrained(path, dtype=dtype)


def reference_encode(tok, model, batch, data, max_length):
    """The reference library as a user without sentence-transformers runs it: tokenizer, AutoModel, mean pooling."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(data), batch):
            enc = tok(data[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1).clamp(min=1e-9))
    return torch.cat(out).float()


def main() -> None:
    import sentence_transformers

    import loom

    p = argparse.ArgumentParser()
    p.add_argument("--models", default="minilm,mpnet,xlm-roberta,modernbert")
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cpu-time", action="store_true")
    args = p.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    data = texts(args.texts)
    print(f"{args.texts} texts of 4-120 words, batch {args.batch}, {args.threads} threads, best of {args.repeats}, "
          f"{'CPU' if args.cpu_time else 'wall'} time\n")
    print("| model | dtype | loom texts/s | sentence-transformers texts/s | reference texts/s | loom/ST | loom/ref | "
          "max abs diff loom vs ST |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            path = folder(name, root)
            for dname in args.dtypes.split(","):
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
                st = sentence_transformers.SentenceTransformer(path, device="cpu", model_kwargs={"dtype": dtype})
                ours = loom.pipeline("feature-extraction", model=path, pooling="auto", dtype=dtype)
                tok, model = reference_load(path, dtype)  # loaded outside the timing, as the other two
                sides = {"loom": lambda: torch.stack(ours(data, batch_size=args.batch, return_tensors=True)),
                         "st": lambda: st.encode(data, batch_size=args.batch, convert_to_tensor=True).float(),
                         "ref": lambda: reference_encode(tok, model, args.batch, data, st.max_seq_length)}
                best, vectors = {}, {}
                for _ in range(args.repeats):
                    for side, run in sides.items():
                        t = clock()
                        vectors[side] = run()
                        best[side] = min(best.get(side, float("inf")), clock() - t)
                t_loom, t_st, t_ref, a, b = best["loom"], best["st"], best["ref"], vectors["loom"], vectors["st"]
                n = len(data)
                print(f"| {name} | {dname} | {n / t_loom:.1f} | {n / t_st:.1f} | {n / t_ref:.1f} | "
                      f"{t_st / t_loom:.2f}x | {t_ref / t_loom:.2f}x | {(a - b).abs().max():.1e} |", flush=True)


if __name__ == "__main__":
    main()
