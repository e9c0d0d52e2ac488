"""feature-extraction (token or sentence embeddings) and sentence-similarity (cosine scores against a source)."""
from __future__ import annotations

from typing import Any

import torch

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.pooling import POOLING_MODES, SentenceConfig, normalize_mode, pool, sentence_config_from_files


def embed(chunk: Chunk, modes: tuple[str, ...], steps: tuple) -> torch.Tensor:
    """One text's sentence embedding: pooled, then the folder's Dense and Normalize modules in order."""
    out = pool(chunk.outputs["last_hidden_state"], modes, chunk.meta.get("start", 0))
    for step in steps:
        out = torch.nn.functional.normalize(out, dim=-1) if step == "normalize" else step(out)
    return out


class _TextEncoderPipeline(Pipeline):
    per_token_outputs = ("last_hidden_state",)

    def tokenize_texts(self, texts: list[str], truncation=True, max_length=None, tokenize_kwargs=None,
                       prompt=None, skip_prompt=False) -> list:
        self.check_texts(texts)
        if prompt:
            texts = [prompt + text for text in texts]
        limit = max_length or self.max_length
        opts = dict(truncation=bool(truncation) and limit is not None, max_length=limit if truncation else None)
        opts.update(tokenize_kwargs or {})
        enc = self.tokenizer(texts, **opts)
        start = self.prompt_length(prompt) if prompt and skip_prompt else 0
        return [Chunk(self.model_inputs(enc, row), meta={"start": start}) for row in range(len(texts))]

    def prompt_length(self, prompt: str) -> int:
        """Tokens the prompt takes at the start of each input (its leading special tokens included, a trailing one
        not), as sentence-transformers counts them for `include_prompt: false`."""
        ids = self.tokenizer(prompt)["input_ids"]
        return len(ids) - (1 if ids and ids[-1] in set(self.tokenizer.all_special_ids) else 0)

    def _forward(self, batch, **_):
        return {"last_hidden_state": self.model(**batch).last_hidden_state}

    def sentence_config(self) -> SentenceConfig:
        """The model folder's sentence-transformers settings (read once)."""
        if not hasattr(self, "_sentence_config"):
            from loom.pipelines.factory import processor_source

            self._sentence_config = sentence_config_from_files(processor_source(self.model))
        return self._sentence_config

    def sentence_params(self, pooling, max_length, prompt_name, prompt, normalize=None) -> tuple[dict, dict]:
        """(tokenizing params, postprocess params) for `pooling`: "auto" follows the folder's sentence-transformers
        config (modes, Dense, Normalize, max_seq_length, default prompt), a mode name pools that way, None keeps the
        token embeddings. `normalize` True/False adds or drops the final L2 normalisation."""
        if prompt_name is not None and prompt is not None:
            raise ValueError("pass prompt_name= (a prompt the model defines) or prompt= (the text), not both")
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt= must be a string, got {type(prompt).__name__}")
        # the folder's config is read only when asked for: token embeddings and explicit modes work without it
        config = self.sentence_config() if pooling == "auto" or prompt_name is not None else SentenceConfig()
        pre = {"max_length": max_length, "prompt": config.prompt_text(prompt_name, prompt)}
        if pooling == "auto":
            if max_length is None and config.max_seq_length is not None:
                pre["max_length"] = min(filter(None, (config.max_seq_length, self.max_length)))
            pre["skip_prompt"] = not config.include_prompt
            steps = config.steps
        else:
            steps = ()
        if normalize is False:
            steps = tuple(step for step in steps if step != "normalize")
        elif normalize and steps[-1:] != ("normalize",):
            steps = steps + ("normalize",)
        modes = config.modes if pooling == "auto" else (normalize_mode(pooling),) if pooling else None
        return pre, {"modes": modes, "steps": steps}


class FeatureExtractionPipeline(_TextEncoderPipeline):
    """Hidden states of the base model. By default, as the reference: a nested list (1, tokens, hidden) per text.
    With `pooling` one vector per text: "auto" follows the model's sentence-transformers folder (its pooling modes,
    Normalize, `max_seq_length` and default prompt), or one of mean/cls/max/mean_sqrt_len/weightedmean/lasttoken;
    L2-normalised when `normalize=True` (with "auto", as the model's config says). `prompt_name=` picks one of the
    folder's prompts (config_sentence_transformers.json), `prompt=` gives the text to put before each input."""

    task = "feature-extraction"

    def _sanitize_parameters(self, truncation=True, max_length=None, tokenize_kwargs=None, return_tensors=False,
                             pooling=None, normalize=None, prompt_name=None, prompt=None,
                             **kwargs) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes truncation, "
                            "max_length, tokenize_kwargs, return_tensors, pooling, normalize, prompt_name, prompt, "
                            "batch_size")
        if pooling is True:
            pooling = "auto"
        if normalize and not pooling:
            raise ValueError("normalize=True needs a pooling mode (pooling='auto', 'mean', ...): token embeddings "
                             "are not normalised")
        pre, post = self.sentence_params(pooling or None, max_length, prompt_name, prompt, normalize)
        pre.update(truncation=truncation, tokenize_kwargs=tokenize_kwargs)
        return pre, {}, {"return_tensors": return_tensors, **post}

    def preprocess_many(self, items: list, **params) -> list[list[Chunk]]:
        return [[chunk] for chunk in self.tokenize_texts(items, **params)]

    def postprocess(self, chunks: list[Chunk], return_tensors=False, modes=None, steps=()) -> Any:
        hidden = chunks[0].outputs["last_hidden_state"]
        out = hidden[None] if modes is None else embed(chunks[0], modes, steps)  # (1, T, H): the reference's layout
        return out if return_tensors else out.tolist()


class SentenceSimilarityPipeline(_TextEncoderPipeline):
    """Cosine similarity between a source sentence and others, with the model's sentence-embedding pooling.

    Input: {"source_sentence": str, "sentences": [str, ...]} (or a list of those); output: a list of floats."""

    task = "sentence-similarity"

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        if inputs is None and "source_sentence" in kwargs:
            inputs = {"source_sentence": kwargs.pop("source_sentence"), "sentences": kwargs.pop("sentences", None)}
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, truncation=True, max_length=None, pooling="auto", prompt_name=None, prompt=None,
                             **kwargs):
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes truncation, "
                            "max_length, pooling, prompt_name, prompt, batch_size")
        if not pooling:
            raise ValueError(f"pooling={pooling!r} is not supported; use 'auto' or one of {POOLING_MODES}")
        pre, post = self.sentence_params(pooling, max_length, prompt_name, prompt)
        pre["truncation"] = truncation
        return pre, {}, post

    def preprocess_many(self, items: list, **params) -> list[list[Chunk]]:
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("source_sentence"), str) or \
                    not isinstance(item.get("sentences"), (list, tuple)) or not item["sentences"]:
                raise ValueError(f"{self.task} pipeline: input {self._window_start + i} must be a dict {{'source_sentence': str, "
                                 "'sentences': [str, ...]}} with at least one sentence")
            out.append(self.tokenize_texts([item["source_sentence"], *item["sentences"]], **params))
        return out

    def postprocess(self, chunks: list[Chunk], modes=("mean",), steps=()) -> list[float]:
        vectors = torch.stack([embed(c, modes, steps) for c in chunks])
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return (vectors[1:] @ vectors[0]).tolist()
