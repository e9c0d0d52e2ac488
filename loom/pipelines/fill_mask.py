"""fill-mask: the most likely tokens for each mask token of a text, optionally restricted to `targets`."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.scores import check_top_k

logger = logging.getLogger("loom")


class FillMaskPipeline(Pipeline):
    """For one mask: a list of {"score", "token", "token_str", "sequence"}, best first; for several masks, one
    such list per mask (each scored on its own, as the reference does)."""

    task = "fill-mask"

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        outputs = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and len(inputs) == 1:
            return outputs[0]  # the reference unwraps a one-element list
        return outputs

    def _sanitize_parameters(self, top_k=5, targets=None, max_length=None, tokenizer_kwargs=None, **kwargs):
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes top_k, targets, "
                            "max_length, tokenizer_kwargs, batch_size")
        if getattr(self.tokenizer, "mask_token_id", None) is None:
            raise ValueError("the tokenizer has no mask token, so it cannot be used for fill-mask")
        check_top_k(top_k)
        post = {"top_k": top_k, "target_ids": self._target_ids(targets) if targets is not None else None}
        return {"max_length": max_length, "tokenizer_kwargs": tokenizer_kwargs}, {}, post

    def _target_ids(self, targets) -> np.ndarray:
        targets = [targets] if isinstance(targets, str) else list(targets)
        vocab = self.tokenizer.get_vocab()
        ids = []
        for target in targets:
            if target in vocab:
                ids.append(vocab[target])
                continue
            pieces = self.tokenizer(target, add_special_tokens=False)["input_ids"]
            if not pieces:
                logger.warning("fill-mask target %r is not in the vocabulary and tokenizes to nothing; ignored",
                               target)
                continue
            logger.warning("fill-mask target %r is not in the vocabulary; using its first token %r", target,
                           self.tokenizer.convert_ids_to_tokens(pieces[0]))
            ids.append(pieces[0])
        if not ids:
            raise ValueError(f"none of the targets {targets} maps to a token of the vocabulary")
        return np.array(sorted(set(ids)))

    def preprocess_many(self, items: list, max_length=None, tokenizer_kwargs=None) -> list[list[Chunk]]:
        self.check_texts(items)
        limit = max_length or self.max_length
        enc = self.tokenizer(items, truncation=limit is not None, max_length=limit, **(tokenizer_kwargs or {}))
        out = []
        mask_id = self.tokenizer.mask_token_id
        for row, text in enumerate(items):
            ids = enc["input_ids"][row]
            if mask_id not in ids:
                where = f" within its first {limit} tokens" if limit and len(ids) >= limit else ""
                raise ValueError(f"fill-mask input {self._window_start + row} has no mask token {self.tokenizer.mask_token!r}{where}: "
                                 f"{text[:80]!r}")
            out.append([Chunk(self.model_inputs(enc, row), {"input_ids": np.array(ids)})])
        return out

    def _forward(self, batch, **_):
        logits = self.model(**batch).logits
        masked = batch["input_ids"] == self.tokenizer.mask_token_id
        # only the rows of masked positions leave the device: (masks in row, vocab) per input
        return {"mask_logits": [logits[row][masked[row]] for row in range(logits.shape[0])]}

    def postprocess(self, chunks: list[Chunk], top_k=5, target_ids=None) -> list:
        ids = chunks[0].meta["input_ids"]
        probs = chunks[0].outputs["mask_logits"].float().softmax(-1)
        positions = np.nonzero(ids == self.tokenizer.mask_token_id)[0]
        if target_ids is not None:
            probs = probs[..., torch.as_tensor(target_ids)]
            top_k = min(top_k, len(target_ids))
        values, predictions = probs.topk(min(top_k, probs.shape[-1]))
        single = len(positions) == 1
        pad = self.tokenizer.pad_token_id
        result = []
        for i, (row_values, row_ids) in enumerate(zip(values.tolist(), predictions.tolist())):
            row = []
            for score, p in zip(row_values, row_ids):
                token = int(target_ids[p]) if target_ids is not None else p
                filled = ids.copy()
                filled[positions[i]] = token
                filled = filled[filled != pad] if pad is not None else filled
                row.append({"score": score, "token": token, "token_str": self.tokenizer.decode([token]),
                            "sequence": self.tokenizer.decode(filled.tolist(), skip_special_tokens=single)})
            result.append(row)
        return result[0] if single else result
