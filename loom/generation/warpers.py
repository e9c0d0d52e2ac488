"""Sampling warpers beyond top-k/top-p/min-p/typical: entropy- and probability-threshold truncation.

Each keeps the reference's thresholds and its `min_tokens_to_keep` rule (the highest-scoring tokens always survive),
and returns a new tensor.
"""
from __future__ import annotations

import math

import torch

from loom.generation.logits_process import LogitsProcessor, _check_min_tokens


def _cutoff(epsilon, name: str) -> float:
    epsilon = float(epsilon)
    if not 0 < epsilon < 1:
        raise ValueError(f"{name} must be a float > 0 and < 1, got {epsilon}")
    return epsilon


def _drop_below(scores: torch.Tensor, drop: torch.Tensor, min_keep: int, filter_value: float) -> torch.Tensor:
    """Filter `drop`, sparing the `min_keep` highest scores."""
    kth = torch.topk(scores, min(min_keep, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(drop & (scores < kth), filter_value)


class EpsilonLogitsWarper(LogitsProcessor):
    """Epsilon sampling: drop tokens whose probability is below `epsilon`."""

    def __init__(self, epsilon: float, filter_value: float = -math.inf, min_tokens_to_keep: int = 1) -> None:
        self.epsilon = _cutoff(epsilon, "epsilon_cutoff")
        _check_min_tokens(min_tokens_to_keep)
        self.filter_value, self.min_tokens_to_keep = filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        return _drop_below(scores, scores.softmax(-1) < self.epsilon, self.min_tokens_to_keep, self.filter_value)


class EtaLogitsWarper(LogitsProcessor):
    """Eta sampling: the cutoff is min(epsilon, sqrt(epsilon) * exp(-entropy)), so flat distributions keep more."""

    def __init__(self, epsilon: float, filter_value: float = -math.inf, min_tokens_to_keep: int = 1,
                 device: str = "cpu") -> None:
        self.epsilon = torch.tensor(_cutoff(epsilon, "eta_cutoff"), device=device)
        _check_min_tokens(min_tokens_to_keep)
        self.filter_value, self.min_tokens_to_keep = filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        logp = scores.log_softmax(-1)
        entropy = -(logp.exp() * logp).nansum(-1)
        epsilon = self.epsilon.to(scores.device)
        eta = torch.minimum(epsilon, epsilon.sqrt() * torch.exp(-entropy))[..., None]
        return _drop_below(scores, logp.exp() < eta, self.min_tokens_to_keep, self.filter_value)


class TopHLogitsWarper(LogitsProcessor):
    """Entropy-bounded truncation: among the 100 most likely tokens, keep the most likely ones while their summed
    entropy terms stay within `top_h` times the entropy of those 100 (the first is always kept)."""

    top_n = 100

    def __init__(self, top_h: float, filter_value: float = -math.inf) -> None:
        if not 0 < top_h <= 1:
            raise ValueError(f"top_h must be in (0, 1], got {top_h}")
        self.top_h, self.filter_value = top_h, filter_value

    def __call__(self, input_ids, scores):
        top_scores, top_ids = torch.topk(scores, min(self.top_n, scores.shape[-1]), dim=-1)
        probs = top_scores.softmax(-1)
        terms = -probs * probs.log()
        keep = terms.cumsum(-1) <= self.top_h * terms.nansum(-1, keepdim=True)
        keep[:, 0] = True
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_ids, keep)
        return scores.masked_fill(~mask, self.filter_value)
