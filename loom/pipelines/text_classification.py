"""text-classification (alias sentiment-analysis): one label and score per text or text pair."""
from __future__ import annotations

from typing import Any

import numpy as np

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.scores import apply_function, check_function, check_top_k, default_function, label_scores

_UNSET = object()


class TextClassificationPipeline(Pipeline):
    """Classify texts or pairs ({"text": ..., "text_pair": ...}). Without `top_k` each input gets its best label
    as {"label", "score"}; with `top_k` (None = all labels) a list of them, best first. Texts longer than the
    model takes are truncated."""

    task = "text-classification"

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        legacy = "top_k" not in kwargs and "top_k" not in self._init_params
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, str) and legacy:
            return [result]
        return result

    def _sanitize_parameters(self, top_k=_UNSET, function_to_apply=None, truncation=True, max_length=None,
                             **kwargs) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes top_k, "
                            "function_to_apply, truncation, max_length, batch_size")
        post: dict[str, Any] = {"function": check_function(function_to_apply)}
        if top_k is not _UNSET:
            check_top_k(top_k)
            post["top_k"] = top_k
        return {"truncation": truncation, "max_length": max_length}, {}, post

    def preprocess_many(self, items: list, truncation=True, max_length=None) -> list[list[Chunk]]:
        texts = [self._text_and_pair(i, item) for i, item in enumerate(items)]
        singles = [i for i, (_, pair) in enumerate(texts) if pair is None]
        pairs = [i for i, (_, pair) in enumerate(texts) if pair is not None]
        limit = max_length or self.max_length
        opts = dict(truncation=bool(truncation) and limit is not None, max_length=limit if truncation else None)
        out: list[list[Chunk]] = [[] for _ in items]
        if singles:
            enc = self.tokenizer([texts[i][0] for i in singles], **opts)
            for row, i in enumerate(singles):
                out[i] = [Chunk(self.model_inputs(enc, row))]
        if pairs:
            enc = self.tokenizer([texts[i][0] for i in pairs], [texts[i][1] for i in pairs], **opts)
            for row, i in enumerate(pairs):
                out[i] = [Chunk(self.model_inputs(enc, row))]
        return out

    def _text_and_pair(self, i: int, item) -> tuple[str, str | None]:
        if isinstance(item, str):
            return item, None
        if isinstance(item, dict) and isinstance(item.get("text"), str) and \
                isinstance(item.get("text_pair"), (str, type(None))):
            return item["text"], item.get("text_pair")
        if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item):
            return item[0], item[1]
        raise ValueError(f"{self.task} pipeline: input {self._window_start + i} is a {type(item).__name__}; pass a string, a "
                         'dict {"text": ..., "text_pair": ...} or a list of those')

    def _forward(self, batch, **_):
        return {"logits": self.model(**batch).logits}

    def postprocess(self, chunks: list[Chunk], function=None, top_k=_UNSET) -> Any:
        logits = chunks[0].outputs["logits"].float().numpy()
        scores = apply_function(logits, function or default_function(self.model.config))
        if top_k is _UNSET:
            best = int(np.argmax(scores))
            return {"label": self.model.config.id2label[best], "score": float(scores[best])}
        return label_scores(scores, self.model.config.id2label, top_k)

