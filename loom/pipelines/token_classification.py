"""token-classification (alias ner): a label per token, or entities grouped by the aggregation strategies
none / simple / first / average / max, with start/end character offsets into the original text."""
from __future__ import annotations

from typing import Any

import numpy as np

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.scores import softmax

STRATEGIES = ("none", "simple", "first", "average", "max")


class TokenClassificationPipeline(Pipeline):
    """Label each token of a text. Texts longer than the model takes are truncated, or split into overlapping
    windows with `stride=N` (entities found in several windows are merged)."""

    task = "token-classification"
    per_token_outputs = ("logits",)

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        words = kwargs.get("is_split_into_words", self._init_params.get("is_split_into_words", False))
        if words and isinstance(inputs, (list, tuple)) and inputs and all(isinstance(w, str) for w in inputs):
            # one pre-split sentence, not a batch of words; like the reference, its answer comes wrapped in a list
            return super().__call__([list(inputs)], **kwargs)
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, aggregation_strategy="none", ignore_labels=None, stride=None,
                             is_split_into_words=False, delimiter=" ", max_length=None, **kwargs):
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes "
                            "aggregation_strategy, ignore_labels, stride, is_split_into_words, delimiter, "
                            "max_length, batch_size")
        strategy = getattr(aggregation_strategy, "value", aggregation_strategy)
        strategy = str(strategy).lower() if strategy is not None else "none"
        if strategy not in STRATEGIES:
            raise ValueError(f"aggregation_strategy={aggregation_strategy!r} is not supported; use one of "
                             f"{STRATEGIES}")
        limit = max_length or self.max_length
        if stride is not None:
            if strategy == "none":
                raise ValueError("stride splits long texts into overlapping windows, whose tokens would be "
                                 "reported twice with aggregation_strategy='none'; pick 'simple', 'first', "
                                 "'average' or 'max'")
            if not isinstance(stride, int) or stride < 0 or (limit is not None and stride >= limit - 2):
                raise ValueError(f"stride must be a non-negative int smaller than the window ({limit} tokens "
                                 f"with special tokens), got {stride!r}")
        pre = {"stride": stride, "words": is_split_into_words, "delimiter": delimiter, "max_length": limit}
        return pre, {}, {"strategy": strategy, "ignore_labels": ["O"] if ignore_labels is None else ignore_labels}

    def preprocess_many(self, items: list, stride=None, words=False, delimiter=" ", max_length=None):
        sentences, word_spans = [], []
        for i, item in enumerate(items):
            if words:
                if not isinstance(item, (list, tuple)) or not all(isinstance(w, str) for w in item):
                    raise TypeError(f"{self.task} pipeline: with is_split_into_words=True input {self._window_start + i} must be a list "
                                    "of words")
                sentences.append(delimiter.join(item))
                starts = np.cumsum([0] + [len(w) + len(delimiter) for w in item[:-1]]).tolist()
                word_spans.append([(s, s + len(w)) for s, w in zip(starts, item)])
            else:
                if not isinstance(item, str):
                    raise TypeError(f"{self.task} pipeline expects strings (or lists of words with "
                                    f"is_split_into_words=True), got {type(item).__name__} at position {self._window_start + i}")
                sentences.append(item)
                word_spans.append(None)
        opts = dict(truncation=max_length is not None, max_length=max_length, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
        if stride is not None:
            opts.update(return_overflowing_tokens=True, stride=stride)
        enc = self.tokenizer([list(w) for w in items] if words else sentences, is_split_into_words=words, **opts)
        owners = enc["overflow_to_sample_mapping"] if stride is not None else range(len(items))
        out: list[list[Chunk]] = [[] for _ in items]
        for row, owner in enumerate(owners):
            meta = {"sentence": sentences[owner], "input_ids": enc["input_ids"][row],
                    "offsets": enc["offset_mapping"][row], "special": enc["special_tokens_mask"][row],
                    "word_ids": enc.word_ids(row) if words else None, "word_spans": word_spans[owner]}
            out[owner].append(Chunk(self.model_inputs(enc, row), meta))
        return out

    def _forward(self, batch, **_):
        return {"logits": self.model(**batch).logits}

    def postprocess(self, chunks: list[Chunk], strategy="none", ignore_labels=("O",)) -> list[dict]:
        entities = []
        for chunk in chunks:
            scores = softmax(chunk.outputs["logits"].float().numpy())
            tokens = self._tokens(chunk.meta, scores, strategy)
            grouped = self._aggregate(tokens, strategy)
            entities += [e for e in grouped if e.get("entity", e.get("entity_group")) not in ignore_labels]
        return _merge_overlapping(entities) if len(chunks) > 1 else entities

    # -- the reference's algorithm, step by step -----------------------------------------------------------------
    def _tokens(self, meta: dict, scores: np.ndarray, strategy: str) -> list[dict]:
        """Per non-special token: its string, scores, character span and whether it continues a word."""
        sentence, ids = meta["sentence"], meta["input_ids"]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        wordpiece = bool(getattr(getattr(backend, "model", None), "continuing_subword_prefix", None))
        unk = getattr(self.tokenizer, "unk_token_id", None)
        out = []
        for idx, token_scores in enumerate(scores):
            if meta["special"][idx]:
                continue
            word = self.tokenizer.convert_ids_to_tokens(int(ids[idx]))
            start, end = (int(x) for x in meta["offsets"][idx])
            if meta["word_ids"] is not None and meta["word_ids"][idx] is not None:
                shift = meta["word_spans"][meta["word_ids"][idx]][0]
                start, end = start + shift, end + shift
            text = sentence[start:end]
            if wordpiece:
                is_subword = len(word) != len(text)
            else:  # no subword marker: a token continues a word when no space precedes it
                is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
            if int(ids[idx]) == unk:
                word, is_subword = text, False
            out.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": idx,
                        "is_subword": is_subword})
        return out

    def _aggregate(self, tokens: list[dict], strategy: str) -> list[dict]:
        id2label = self.model.config.id2label
        if strategy in ("none", "simple"):
            entities = []
            for t in tokens:
                best = int(t["scores"].argmax())
                entities.append({"entity": id2label[best], "score": float(t["scores"][best]), "index": t["index"],
                                 "word": t["word"], "start": t["start"], "end": t["end"]})
        else:
            entities = [self._word_entity(group, strategy) for group in _words(tokens)]
        return entities if strategy == "none" else self._group(entities)

    def _word_entity(self, tokens: list[dict], strategy: str) -> dict:
        if strategy == "first":
            scores = tokens[0]["scores"]
        elif strategy == "max":
            scores = max(tokens, key=lambda t: t["scores"].max())["scores"]
        else:
            scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
        best = int(scores.argmax())
        return {"entity": self.model.config.id2label[best], "score": float(scores[best]),
                "word": self.tokenizer.convert_tokens_to_string([t["word"] for t in tokens]),
                "start": tokens[0]["start"], "end": tokens[-1]["end"]}

    def _group(self, entities: list[dict]) -> list[dict]:
        """Merge neighbours with the same tag; a B- tag starts a new group."""
        groups, current = [], []
        for entity in entities:
            bi, tag = _tag(entity["entity"])
            if current and (tag != _tag(current[-1]["entity"])[1] or bi == "B"):
                groups.append(self._group_entity(current))
                current = []
            current.append(entity)
        if current:
            groups.append(self._group_entity(current))
        return groups

    def _group_entity(self, entities: list[dict]) -> dict:
        return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                "score": float(np.nanmean([e["score"] for e in entities])),
                "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
                "start": entities[0]["start"], "end": entities[-1]["end"]}


def _tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _words(tokens: list[dict]) -> list[list[dict]]:
    words: list[list[dict]] = []
    for t in tokens:
        if words and t["is_subword"]:
            words[-1].append(t)
        else:
            words.append([t])
    return words


def _merge_overlapping(entities: list[dict]) -> list[dict]:
    """Entities from overlapping windows: of those that overlap, keep the longest (then the higher score)."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    kept, previous = [], entities[0]
    for entity in entities[1:]:
        if previous["start"] <= entity["start"] < previous["end"]:
            longer = entity["end"] - entity["start"] > previous["end"] - previous["start"]
            same = entity["end"] - entity["start"] == previous["end"] - previous["start"]
            if longer or same and entity["score"] > previous["score"]:
                previous = entity
        else:
            kept.append(previous)
            previous = entity
    kept.append(previous)
    return kept
