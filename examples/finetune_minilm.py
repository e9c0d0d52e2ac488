"""Fine-tune the embedded all-MiniLM-L6-v2 for sentence classification and report held-out accuracy.

    python examples/finetune_minilm.py [--epochs 3] [--output-dir /tmp/minilm-sentiment]   (loom installed or on
    PYTHONPATH)

The data is examples/data/sentiment.jsonl: 400 short template sentences labelled positive (1) or negative (0). The
held-out set uses subjects the training set never sees, so the model has to learn the sentiment words. Runs in a
few minutes on a laptop CPU.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from loom import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
from loom.hub import packaged_model_dir

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DATA = Path(__file__).with_name("data") / "sentiment.jsonl"
HELD_OUT_SUBJECTS = ("the museum", "the show", "the game", "the course")


def load_splits(tokenizer) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    train, test = [], []
    for row in rows:
        example = {**tokenizer(row["text"], truncation=True, max_length=64), "label": row["label"]}
        held_out = any(s in row["text"].lower() for s in HELD_OUT_SUBJECTS)
        (test if held_out else train).append(example)
    return train, test


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--output-dir", default="/tmp/minilm-sentiment")
    opts = parser.parse_args()

    path = packaged_model_dir(MODEL) or MODEL  # the embedded copy: no network needed
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train, test = load_splits(tokenizer)
    print(f"{len(train)} training and {len(test)} held-out sentences")
    args = TrainingArguments(output_dir=opts.output_dir, num_train_epochs=opts.epochs, learning_rate=5e-5,
                             per_device_train_batch_size=16, per_device_eval_batch_size=64, warmup_ratio=0.1,
                             weight_decay=0.01, logging_steps=10, eval_strategy="epoch", save_strategy="epoch",
                             save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="accuracy",
                             seed=0)
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
                      compute_metrics=accuracy)
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    print(f"held-out accuracy: {before:.3f} before fine-tuning, {after:.3f} after")
    trainer.save_model(Path(opts.output_dir) / "final")


if __name__ == "__main__":
    main()
