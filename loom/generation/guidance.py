"""Classifier-free guidance processors: push the next-token distribution away from an unconditional one,
`uncond + scale * (cond - uncond)`.

The batched form reads both halves from one forward whose batch holds the conditional rows then the unconditional
ones; the unbatched form runs the unconditional branch itself, one model call per step, keeping that branch's cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.generation.logits_process import LogitsProcessor


class ClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    """CFG over a doubled batch: rows [0, B) of `scores` are conditional, rows [B, 2B) unconditional; returns (B, V)."""

    def __init__(self, guidance_scale: float) -> None:
        if not guidance_scale > 1:
            raise ValueError(f"guidance_scale must be > 1 for classifier-free guidance, got {guidance_scale}; 1 is "
                             "no guidance (leave the processor out)")
        self.guidance_scale = guidance_scale

    def __call__(self, input_ids, scores):
        if scores.shape[0] != 2 * input_ids.shape[0]:
            raise ValueError(f"classifier-free guidance needs scores for twice the batch of input_ids (conditional "
                             f"rows, then unconditional ones): got {scores.shape[0]} score rows for "
                             f"{input_ids.shape[0]} input rows")
        cond, uncond = scores.chunk(2, dim=0)
        return uncond + self.guidance_scale * (cond - uncond)


class UnbatchedClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    """CFG whose unconditional branch this processor runs with `model`: first on `unconditional_ids` (by default the
    prompt's last token), then on each generated token. Works on log-probabilities; scale 1 returns them unguided."""

    def __init__(self, guidance_scale: float, model, unconditional_ids: torch.LongTensor | None = None,
                 unconditional_attention_mask: torch.LongTensor | None = None, use_cache: bool = True) -> None:
        self.guidance_scale = guidance_scale
        self.model = model
        self.unconditional_ids = unconditional_ids
        self.unconditional_attention_mask = unconditional_attention_mask
        self.use_cache = use_cache
        self._past = None
        self._started = False

    def _unconditional_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if not self._started:
            ids = self.unconditional_ids if self.unconditional_ids is not None else input_ids[:, -1:]
            mask = self.unconditional_attention_mask
            mask = torch.ones_like(ids, dtype=torch.long) if mask is None else mask
            step_ids, self._started = ids, True
        else:  # the branch follows the tokens actually generated
            newest = input_ids[:, -1:]
            ids = torch.cat([self.unconditional_ids, newest], dim=1)
            mask = torch.cat([self.unconditional_attention_mask, torch.ones_like(newest, dtype=torch.long)], dim=1)
            step_ids = newest if self.use_cache else ids
        self.unconditional_ids, self.unconditional_attention_mask = ids, mask
        out = self.model(step_ids, attention_mask=mask, use_cache=self.use_cache, past_key_values=self._past)
        self._past = getattr(out, "past_key_values", None) if self.use_cache else None
        return out.logits[:, -1]

    def __call__(self, input_ids, scores):
        scores = F.log_softmax(scores, dim=-1)
        if self.guidance_scale == 1:
            return scores
        uncond = F.log_softmax(self._unconditional_logits(input_ids), dim=-1)
        return uncond + self.guidance_scale * (scores - uncond)
