"""zero-shot-classification: score any candidate labels with an NLI model ("premise entails 'This example is
{label}.'"), one forward row per (text, label) pair, all batched together."""
from __future__ import annotations

from typing import Any

import numpy as np

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.scores import softmax


class ZeroShotClassificationPipeline(Pipeline):
    """Output per text: {"sequence", "labels", "scores"}, labels sorted best first. With multi_label=False the
    scores are a softmax of the entailment logits over the labels; with multi_label=True each label is scored on
    its own (entailment vs contradiction)."""

    task = "zero-shot-classification"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entailment_id = next((i for label, i in self.model.config.label2id.items()
                                   if label.lower().startswith("entail")), None)
        if self.entailment_id is None:
            raise ValueError(f"zero-shot-classification needs an NLI model whose label2id names an 'entailment' "
                             f"label; this model's labels are {list(self.model.config.label2id)}")

    def __call__(self, sequences: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and "candidate_labels" not in kwargs:
            kwargs["candidate_labels"] = args[0]
        elif args:
            raise TypeError(f"zero-shot-classification takes the texts and candidate_labels, got extra arguments "
                            f"{args}")
        return super().__call__(sequences, **kwargs)

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template="This example is {}.",
                             multi_label=False, max_length=None, **kwargs):
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes "
                            "candidate_labels, hypothesis_template, multi_label, max_length, batch_size")
        if candidate_labels is None:  # allowed when building the pipeline; each call must bring labels
            return {"labels": None}, {}, {"multi_label": multi_label}
        if isinstance(candidate_labels, str):
            candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
        if not candidate_labels or not all(isinstance(label, str) for label in candidate_labels):
            raise ValueError("candidate_labels must be a non-empty list of strings (or a comma-separated string)")
        if hypothesis_template.format(candidate_labels[0]) == hypothesis_template:
            raise ValueError(f"hypothesis_template {hypothesis_template!r} has no '{{}}' where the label goes")
        pre = {"labels": list(candidate_labels), "template": hypothesis_template, "max_length": max_length}
        return pre, {}, {"multi_label": multi_label}

    def preprocess_many(self, items: list, labels=None, template="", max_length=None) -> list[list[Chunk]]:
        if labels is None:
            raise ValueError("zero-shot-classification needs candidate_labels, e.g. pipe(text, "
                             "candidate_labels=['sports', 'politics'])")
        self.check_texts(items, "sequence")
        for i, item in enumerate(items):
            if not item.strip():
                raise ValueError(f"{self.task} pipeline: sequence {self._window_start + i} is empty; pass some text to classify")
        limit = max_length or self.max_length
        premises = [text for text in items for _ in labels]
        hypotheses = [template.format(label) for _ in items for label in labels]
        enc = self.tokenizer(premises, hypotheses, truncation="only_first" if limit else False, max_length=limit)
        n = len(labels)
        return [[Chunk(self.model_inputs(enc, i * n + j), {"label": label, "sequence": text})
                 for j, label in enumerate(labels)] for i, text in enumerate(items)]

    def _forward(self, batch, **_):
        return {"logits": self.model(**batch).logits}

    def postprocess(self, chunks: list[Chunk], multi_label=False) -> dict:
        logits = np.stack([c.outputs["logits"].float().numpy() for c in chunks])  # (labels, classes)
        if multi_label or len(chunks) == 1:
            contradiction = -1 if self.entailment_id == 0 else 0
            scores = softmax(logits[:, [contradiction, self.entailment_id]])[:, 1]
        else:
            scores = softmax(logits[:, self.entailment_id])
        order = list(reversed(scores.argsort()))
        return {"sequence": chunks[0].meta["sequence"], "labels": [chunks[i].meta["label"] for i in order],
                "scores": [float(scores[i]) for i in order]}
