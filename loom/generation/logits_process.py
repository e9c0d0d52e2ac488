"""Logits processors: functions of (tokens so far, next-token scores) -> new scores, applied in order each step.

The arithmetic follows the reference's processors so that the processed distributions (and therefore greedy and beam
search tokens) match it exactly. Every processor returns a new tensor; none modifies its input.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class LogitsProcessor:
    """Base class: `__call__(input_ids (B, T), scores (B, V)) -> scores (B, V)`."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LogitsProcessorList(list):
    """A list of processors, itself callable: applies each in order."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores, **kwargs) if kwargs else processor(input_ids, scores)
        return scores


def _token_ids(ids, device) -> torch.Tensor:
    """EOS-style ids (an int, a list or a tensor) as a 1-D long tensor; negative ids are a ValueError."""
    ids = torch.as_tensor(ids, device=device).view(-1)
    if ids.is_floating_point() or (ids < 0).any():
        raise ValueError(f"token ids must be non-negative integers, got {ids.tolist()}")
    return ids.long()


def _check_min_tokens(min_tokens_to_keep) -> None:
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be a positive int, got {min_tokens_to_keep!r}")


def _vocab_mask(ids: torch.Tensor, vocab_size: int, device) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ids = ids.to(device)
    mask[ids[(ids >= 0) & (ids < vocab_size)]] = True
    return mask


class MinLengthLogitsProcessor(LogitsProcessor):
    """Forbid EOS while the whole sequence (prompt included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_id, device: str = "cpu") -> None:
        if not isinstance(min_length, int) or min_length < 0:
            raise ValueError(f"min_length must be a non-negative int, got {min_length!r}")
        self.min_length, self.eos_token_id = min_length, _token_ids(eos_token_id, device)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] >= self.min_length:
            return scores
        return scores.masked_fill(_vocab_mask(self.eos_token_id, scores.shape[-1], scores.device), -math.inf)


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    """Forbid EOS until `min_new_tokens` tokens follow the prompt."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id, device: str = "cpu") -> None:
        for name, value in (("prompt_length_to_skip", prompt_length_to_skip), ("min_new_tokens", min_new_tokens)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.prompt_length_to_skip, self.min_new_tokens = prompt_length_to_skip, min_new_tokens
        self.eos_token_id = _token_ids(eos_token_id, device)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] - self.prompt_length_to_skip >= self.min_new_tokens:
            return scores
        return scores.masked_fill(_vocab_mask(self.eos_token_id, scores.shape[-1], scores.device), -math.inf)


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """Divide positive (multiply negative) scores of tokens already present by `penalty` (CTRL's rule).

    `prompt_ignore_length` (an int, or (B,) per row) skips each row's first tokens (the prompt, or its left
    padding)."""

    def __init__(self, penalty: float, prompt_ignore_length: int | torch.Tensor | None = None) -> None:
        if not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a float > 0, got {penalty!r}")
        if isinstance(prompt_ignore_length, int) and prompt_ignore_length < 0:
            raise ValueError(f"prompt_ignore_length must be a non-negative int, got {prompt_ignore_length}")
        self.penalty, self.prompt_ignore_length = float(penalty), prompt_ignore_length

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        if self.prompt_ignore_length is not None:
            skip = torch.as_tensor(self.prompt_ignore_length, device=input_ids.device).view(-1, 1)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(positions[None, :] < skip, vocab)
        ids = input_ids.clamp(max=vocab)
        padded = F.pad(scores, (0, 1))  # column `vocab` absorbs the ignored positions
        picked = padded.gather(1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return padded.scatter(1, ids, picked)[:, :vocab]


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Forbid any token that would repeat an n-gram already present in the sequence (prompt included)."""

    def __init__(self, ngram_size: int) -> None:
        if not isinstance(ngram_size, int) or ngram_size <= 0:
            raise ValueError(f"no_repeat_ngram_size must be a positive int, got {ngram_size}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids, scores):
        T, n = input_ids.shape[-1], self.ngram_size
        if T < n:
            return scores
        prefix = input_ids[:, T + 1 - n:]  # the n-1 last tokens
        windows = input_ids.unfold(1, n, 1)  # (B, T-n+1, n)
        hits = (windows[..., :-1] == prefix[:, None]).all(-1)
        vocab = scores.shape[-1]
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(hits, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], -math.inf)


class NoBadWordsLogitsProcessor(LogitsProcessor):
    """Forbid token sequences: a one-token entry is always banned; a longer one bans its last token whenever the
    sequence ends with the entry's prefix. Entries equal to an EOS id are dropped (the reference's rule)."""

    def __init__(self, bad_words_ids: list[list[int]], eos_token_id=None) -> None:
        if (not isinstance(bad_words_ids, list) or not bad_words_ids
                or any(not isinstance(w, list) or not w or any(not isinstance(t, int) or t < 0 for t in w)
                       for w in bad_words_ids)):
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got "
                             f"{bad_words_ids!r}")
        eos = [] if eos_token_id is None else torch.as_tensor(eos_token_id).view(-1).tolist()
        words = [w for w in bad_words_ids if not (len(w) == 1 and w[0] in eos)]
        self.bad_word_ids = bad_words_ids
        self.single = sorted({w[0] for w in words if len(w) == 1})
        by_len: dict[int, list[list[int]]] = {}
        for w in words:
            if len(w) > 1:
                by_len.setdefault(len(w) - 1, []).append(w)
        self.groups = [(torch.tensor([w[:-1] for w in ws]), torch.tensor([w[-1] for w in ws]))
                       for ws in by_len.values()]

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        too_big = [t for t in self.single if t >= vocab] + [int(t) for _, last in self.groups for t in last
                                                            if t >= vocab]
        if too_big:
            raise ValueError(f"bad_words_ids has token ids {too_big} outside the vocabulary of size {vocab}")
        banned = torch.zeros_like(scores, dtype=torch.bool)
        if self.single:
            banned[:, self.single] = True
        for prefixes, last in self.groups:
            n = prefixes.shape[1]
            if n > input_ids.shape[1]:
                continue
            hit = (input_ids[:, None, -n:] == prefixes.to(input_ids.device)).all(-1)  # (B, words)
            rows, words = hit.nonzero(as_tuple=True)
            banned[rows, last.to(scores.device)[words]] = True
        return scores.masked_fill(banned, -math.inf)


class ForcedBOSTokenLogitsProcessor(LogitsProcessor):
    """Force `bos_token_id` as the first generated token (when the sequence has one token)."""

    def __init__(self, bos_token_id: int) -> None:
        self.bos_token_id = bos_token_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != 1:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, self.bos_token_id] = 0
        return out


class ForcedEOSTokenLogitsProcessor(LogitsProcessor):
    """Force an EOS token as the last token when `max_length` is about to be reached."""

    def __init__(self, max_length: int, eos_token_id, device: str = "cpu") -> None:
        self.max_length, self.eos_token_id = max_length, _token_ids(eos_token_id, device)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != self.max_length - 1:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, self.eos_token_id.to(scores.device)] = 0
        return out


class SuppressTokensLogitsProcessor(LogitsProcessor):
    """Never generate the given tokens."""

    def __init__(self, suppress_tokens, device: str = "cpu") -> None:
        self.suppress_tokens = torch.as_tensor(list(suppress_tokens), dtype=torch.long, device=device)

    def __call__(self, input_ids, scores):
        return scores.masked_fill(_vocab_mask(self.suppress_tokens, scores.shape[-1], scores.device), -math.inf)


# -- warpers: only used when sampling --------------------------------------------------------------------------------
class TemperatureLogitsWarper(LogitsProcessor):
    def __init__(self, temperature: float) -> None:
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a float > 0, got {temperature}")
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopKLogitsWarper(LogitsProcessor):
    """Keep the k highest scores (ties with the k-th included)."""

    def __init__(self, top_k: int, filter_value: float = -math.inf, min_tokens_to_keep: int = 1) -> None:
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive int, got {top_k}")
        self.top_k, self.filter_value = max(top_k, min_tokens_to_keep), filter_value

    def __call__(self, input_ids, scores):
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(scores < kth, self.filter_value)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus: keep the smallest set of top tokens whose probability mass exceeds `top_p`."""

    def __init__(self, top_p: float, filter_value: float = -math.inf, min_tokens_to_keep: int = 1) -> None:
        if not 0 <= float(top_p) <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        _check_min_tokens(min_tokens_to_keep)
        self.top_p, self.min_keep, self.filter_value = float(top_p), min_tokens_to_keep, filter_value

    def __call__(self, input_ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        mass_below = sorted_scores.softmax(-1).cumsum(-1)
        drop = mass_below <= (1 - self.top_p)
        drop[..., -self.min_keep:] = False
        return scores.masked_fill(drop.scatter(1, order, drop), self.filter_value)


class MinPLogitsWarper(LogitsProcessor):
    """Drop tokens whose probability is below `min_p` times the top token's probability."""

    def __init__(self, min_p: float, filter_value: float = -math.inf, min_tokens_to_keep: int = 1) -> None:
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        _check_min_tokens(min_tokens_to_keep)
        self.min_p, self.min_keep, self.filter_value = min_p, min_tokens_to_keep, filter_value

    def __call__(self, input_ids, scores):
        probs = scores.softmax(-1)
        drop = probs < self.min_p * probs.amax(-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_keep, probs.shape[-1]), dim=-1).indices
        drop.scatter_(-1, keep, False)
        return scores.masked_fill(drop, self.filter_value)


class TypicalLogitsWarper(LogitsProcessor):
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy, up to mass `typical_p`."""

    def __init__(self, mass: float = 0.9, filter_value: float = -math.inf, min_tokens_to_keep: int = 1) -> None:
        if not 0 < float(mass) < 1:
            raise ValueError(f"typical_p must be in (0, 1), got {mass}")
        _check_min_tokens(min_tokens_to_keep)
        self.mass, self.min_keep, self.filter_value = float(mass), min_tokens_to_keep, filter_value

    def __call__(self, input_ids, scores):
        logp = scores.log_softmax(-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
        distance = (-logp - entropy).abs()
        sorted_distance, order = torch.sort(distance, descending=False)
        mass = scores.gather(-1, order).softmax(-1).cumsum(-1)
        last = (mass < self.mass).sum(1).clamp_(max=sorted_distance.shape[-1] - 1)
        drop = sorted_distance > sorted_distance.gather(1, last.view(-1, 1))
        drop[..., :self.min_keep] = False
        return scores.masked_fill(drop.scatter(1, order, drop), self.filter_value)
