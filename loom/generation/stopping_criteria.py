"""Stopping criteria: `(tokens so far (B, T), scores) -> (B,) bool`, True where a row is done."""
from __future__ import annotations

import copy
import time
import warnings

import torch


class StoppingCriteria:
    """Base class; subclasses return a (B,) bool tensor, True for rows that should stop."""

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        raise NotImplementedError


class StoppingCriteriaList(list):
    """A list of criteria, itself callable: a row stops when any criterion says so."""

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self:
            done = done | criterion(input_ids, scores, **kwargs).to(done.device)
        return done

    @property
    def max_length(self) -> int | None:
        return next((c.max_length for c in self if isinstance(c, MaxLengthCriteria)), None)


class MaxLengthCriteria(StoppingCriteria):
    """Stop every row once the sequence (prompt included) has `max_length` tokens."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def __call__(self, input_ids, scores=None, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.max_length, dtype=torch.bool,
                          device=input_ids.device)


class MaxTimeCriteria(StoppingCriteria):
    """Stop every row once `max_time` seconds have passed since construction (or `initial_timestamp`)."""

    def __init__(self, max_time: float, initial_timestamp: float | None = None) -> None:
        self.max_time = max_time
        self.initial_timestamp = time.time() if initial_timestamp is None else initial_timestamp

    def __call__(self, input_ids, scores=None, **kwargs):
        done = time.time() - self.initial_timestamp > self.max_time
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class EosTokenCriteria(StoppingCriteria):
    """Stop a row when its last token is one of the EOS ids."""

    def __init__(self, eos_token_id) -> None:
        self.eos_token_id = torch.as_tensor(eos_token_id).view(-1)

    def __call__(self, input_ids, scores=None, **kwargs):
        return torch.isin(input_ids[:, -1], self.eos_token_id.to(input_ids.device))


class StopStringCriteria(StoppingCriteria):
    """Stop a row when its decoded text contains a stop string that overlaps the last token.

    As in the reference, an occurrence counts only if it reaches into the newest token's text, so a stop string in
    the prompt (or several tokens back) never triggers; a token that runs past the end of the stop string does.
    Each step decodes only a short tail of each row, long enough to hold the longest stop string.
    """

    def __init__(self, tokenizer, stop_strings: str | list[str]) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not stop_strings or any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must be a non-empty string or list of non-empty strings, got "
                             f"{stop_strings!r}")
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        # A token holds at least one character, except byte pieces of a multi-byte character (up to 4 per char).
        self.tail = 4 * max(len(s) for s in self.stop_strings) + 2

    def _hit(self, row: list[int]) -> bool:
        decode = self.tokenizer.decode
        before = decode(row[:-1], skip_special_tokens=False)
        text = decode(row, skip_special_tokens=False)
        start = len(before.rstrip("\ufffd"))  # where the newest token's text begins
        return any(text.find(s, max(0, start - len(s) + 1)) != -1 for s in self.stop_strings)

    def __call__(self, input_ids, scores=None, **kwargs):
        rows = input_ids[:, -self.tail:].tolist()
        return torch.tensor([self._hit(r) for r in rows], dtype=torch.bool, device=input_ids.device)


class ConfidenceCriteria(StoppingCriteria):
    """Stop (assisted decoding's draft model) when the probability of the newest token, under the last step's
    scores, falls below `assistant_confidence_threshold`. Batch size 1, as in the reference."""

    def __init__(self, assistant_confidence_threshold: float) -> None:
        self.assistant_confidence_threshold = assistant_confidence_threshold

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        probability = scores[-1].softmax(-1)[0, input_ids[0, -1]].item()
        return probability < self.assistant_confidence_threshold


def validate_stopping_criteria(stopping_criteria: StoppingCriteriaList, max_length: int) -> StoppingCriteriaList:
    """A copy of `stopping_criteria` that stops at `max_length`: a MaxLengthCriteria is added when there is none,
    and a UserWarning says when the list's own max_length differs."""
    own = stopping_criteria.max_length
    out = copy.deepcopy(stopping_criteria)
    if own is None:
        out.append(MaxLengthCriteria(max_length))
    elif own != max_length:
        warnings.warn(f"the stopping criteria stop at max_length={own} but max_length={max_length} was given; the "
                      "criteria's value applies", UserWarning)
    return out


def build_stopping_criteria(cfg, tokenizer=None, custom: StoppingCriteriaList | None = None) -> StoppingCriteriaList:
    out = StoppingCriteriaList()
    if cfg.max_length is not None:
        out.append(MaxLengthCriteria(cfg.max_length))
    if cfg.max_time is not None:
        out.append(MaxTimeCriteria(cfg.max_time))
    if cfg.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer to read the generated text: pass "
                             "generate(..., tokenizer=tokenizer)")
        out.append(StopStringCriteria(tokenizer, cfg.stop_strings))
    if cfg._eos_tensor is not None:
        out.append(EosTokenCriteria(cfg._eos_tensor))
    if custom:
        merged = StoppingCriteriaList(next((c for c in custom if type(c) is type(d)), d) for d in out)
        merged.extend(c for c in custom if c not in merged)
        out = merged
    return out
