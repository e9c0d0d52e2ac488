"""feature-extraction (token or sentence embeddings) and sentence-similarity (cosine scores against a source)."""
from __future__ import annotations

from typing import Any

import torch

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.pooling import POOLING_MODES, pool, pooling_from_files


class _TextEncoderPipeline(Pipeline):
    per_token_outputs = ("last_hidden_state",)

    def tokenize_texts(self, texts: list[str], truncation=True, max_length=None, tokenize_kwargs=None) -> list:
        self.check_texts(texts)
        limit = max_length or self.max_length
        opts = dict(truncation=bool(truncation) and limit is not None, max_length=limit if truncation else None)
        opts.update(tokenize_kwargs or {})
        enc = self.tokenizer(texts, **opts)
        return [Chunk(self.model_inputs(enc, row)) for row in range(len(texts))]

    def _forward(self, batch, **_):
        return {"last_hidden_state": self.model(**batch).last_hidden_state}

    def model_pooling(self) -> tuple[str, bool]:
        if not hasattr(self, "_model_pooling"):
            from loom.pipelines.factory import processor_source

            self._model_pooling = pooling_from_files(processor_source(self.model))
        return self._model_pooling


class FeatureExtractionPipeline(_TextEncoderPipeline):
    """Hidden states of the base model. By default, as the reference: a nested list (1, tokens, hidden) per text.
    With `pooling` ("auto" = the model's sentence-transformers config, or one of mean/cls/max/mean_sqrt_len) one
    vector per text, L2-normalised when `normalize=True` (with "auto", as the model's config says)."""

    task = "feature-extraction"

    def _sanitize_parameters(self, truncation=True, max_length=None, tokenize_kwargs=None, return_tensors=False,
                             pooling=None, normalize=None, **kwargs) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes truncation, "
                            "max_length, tokenize_kwargs, return_tensors, pooling, normalize, batch_size")
        if pooling is True:
            pooling = "auto"
        if pooling not in (None, False, "auto") + POOLING_MODES:
            raise ValueError(f"pooling={pooling!r} is not supported; use None, 'auto' or one of {POOLING_MODES}")
        if normalize and not pooling:
            raise ValueError("normalize=True needs a pooling mode (pooling='auto', 'mean', ...): token embeddings "
                             "are not normalised")
        pre = {"truncation": truncation, "max_length": max_length, "tokenize_kwargs": tokenize_kwargs}
        return pre, {}, {"return_tensors": return_tensors, "pooling": pooling or None, "normalize": normalize}

    def preprocess_many(self, items: list, **params) -> list[list[Chunk]]:
        return [[chunk] for chunk in self.tokenize_texts(items, **params)]

    def postprocess(self, chunks: list[Chunk], return_tensors=False, pooling=None, normalize=None) -> Any:
        hidden = chunks[0].outputs["last_hidden_state"]
        if pooling is None:
            out = hidden[None]  # (1, T, H), the reference's layout
        else:
            mode, model_normalize = self.model_pooling() if pooling == "auto" else (pooling, False)
            out = pool(hidden, mode)
            if normalize if normalize is not None else model_normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
        return out if return_tensors else out.tolist()


class SentenceSimilarityPipeline(_TextEncoderPipeline):
    """Cosine similarity between a source sentence and others, with the model's sentence-embedding pooling.

    Input: {"source_sentence": str, "sentences": [str, ...]} (or a list of those); output: a list of floats."""

    task = "sentence-similarity"

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        if inputs is None and "source_sentence" in kwargs:
            inputs = {"source_sentence": kwargs.pop("source_sentence"), "sentences": kwargs.pop("sentences", None)}
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, truncation=True, max_length=None, pooling="auto", **kwargs):
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes truncation, "
                            "max_length, pooling, batch_size")
        if pooling not in ("auto",) + POOLING_MODES:
            raise ValueError(f"pooling={pooling!r} is not supported; use 'auto' or one of {POOLING_MODES}")
        return {"truncation": truncation, "max_length": max_length}, {}, {"pooling": pooling}

    def preprocess_many(self, items: list, **params) -> list[list[Chunk]]:
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("source_sentence"), str) or \
                    not isinstance(item.get("sentences"), (list, tuple)) or not item["sentences"]:
                raise ValueError(f"{self.task} pipeline: input {self._window_start + i} must be a dict {{'source_sentence': str, "
                                 "'sentences': [str, ...]}} with at least one sentence")
            out.append(self.tokenize_texts([item["source_sentence"], *item["sentences"]], **params))
        return out

    def postprocess(self, chunks: list[Chunk], pooling="auto") -> list[float]:
        mode = self.model_pooling()[0] if pooling == "auto" else pooling
        vectors = torch.stack([pool(c.outputs["last_hidden_state"], mode) for c in chunks])
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return (vectors[1:] @ vectors[0]).tolist()
