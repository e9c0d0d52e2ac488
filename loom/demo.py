"""The README's main job: semantic search with the embedded all-MiniLM-L6-v2 sentence-embedding model.

Embeds the sentences in examples/data/sentences.txt and the queries in examples/data/queries.txt through
`pipeline("feature-extraction", pooling="auto")` (the model's own sentence-transformers pooling: mean over real
tokens, L2-normalised), then prints each query's best matches and a similarity table, so a person can check that the
matches make sense.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def embed(extractor, texts: list[str]):
    """(len(texts), 384) unit vectors, so a dot product is a cosine similarity."""
    import torch

    return torch.stack(extractor(texts, pooling="auto", return_tensors=True, batch_size=16))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=Path, default=DATA / "sentences.txt")
    parser.add_argument("--queries", type=Path, default=DATA / "queries.txt")
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args(argv)

    from loom import pipeline

    start = time.perf_counter()
    extractor = pipeline("feature-extraction", model=MODEL_ID)
    corpus = [s for s in args.sentences.read_text().splitlines() if s.strip()]
    queries = [s for s in args.queries.read_text().splitlines() if s.strip()]
    scores = embed(extractor, queries) @ embed(extractor, corpus).T
    elapsed = time.perf_counter() - start

    millions = extractor.model.num_parameters() / 1e6
    print(f"Semantic search with {MODEL_ID} ({millions:.1f}M parameters, loaded and run in {elapsed:.2f} s)\n")
    for qi, query in enumerate(queries):
        print(f"Query: {query}")
        best = scores[qi].topk(min(args.top, len(corpus)))
        for score, idx in zip(best.values.tolist(), best.indices.tolist()):
            print(f"  {score:6.3f}  {corpus[idx]}")
        print()
    print("Cosine similarity, queries (rows) x sentences (columns 1..N):")
    print("      " + "".join(f"{j + 1:>6d}" for j in range(len(corpus))))
    for qi in range(len(queries)):
        print(f"q{qi + 1:<4d}" + "".join(f"{v:6.2f}" for v in scores[qi].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
