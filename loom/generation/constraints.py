"""Logits processors that steer what may be generated: sequence biases, allowed-token callbacks, the encoder-side
repetition rules, a length-dependent EOS boost, and two numerical clean-ups. Semantics follow the reference's
processors of the same names; each returns a new tensor.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from loom.generation.logits_process import LogitsProcessor, _token_ids


def _is_token_id(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _sequence_bias_dict(sequence_bias) -> dict[tuple[int, ...], float]:
    """`{(ids...): bias}` or `[[ids, bias], ...]` -> the dict form; anything else is a ValueError naming the rule."""
    if not isinstance(sequence_bias, (dict, list)) or not sequence_bias:
        raise ValueError(f"sequence_bias must be a non-empty dict {{(token ids...): bias}} or a non-empty list "
                         f"[[token ids, bias], ...], got {sequence_bias!r}")
    if isinstance(sequence_bias, list):
        for entry in sequence_bias:
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], list) or not entry[0]
                    or not all(_is_token_id(t) for t in entry[0]) or not isinstance(entry[1], float)):
                raise ValueError(f"each sequence_bias entry must be [list of non-negative token ids, float bias], got "
                                 f"{entry!r}")
        return {tuple(ids): bias for ids, bias in sequence_bias}
    for ids, bias in sequence_bias.items():
        if not isinstance(ids, tuple) or not ids or not all(_is_token_id(t) for t in ids):
            raise ValueError(f"sequence_bias keys must be non-empty tuples of token ids, got {ids!r}")
        if not isinstance(bias, float):
            raise ValueError(f"sequence_bias values must be floats, got {bias!r} for {ids}")
    return dict(sequence_bias)


class SequenceBiasLogitsProcessor(LogitsProcessor):
    """Add a bias to a token whenever it would complete one of the given sequences (a one-token sequence is
    always biased)."""

    def __init__(self, sequence_bias) -> None:
        self.sequence_bias = _sequence_bias_dict(sequence_bias)

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        too_big = sorted({t for ids in self.sequence_bias for t in ids if t >= vocab})
        if too_big:
            raise ValueError(f"sequence_bias has token ids {too_big} outside the vocabulary of size {vocab}")
        bias = torch.zeros_like(scores)
        for ids, value in self.sequence_bias.items():
            if len(ids) == 1:
                bias[:, ids[0]] += value
            elif len(ids) <= input_ids.shape[1]:
                prefix = torch.tensor(ids[:-1], dtype=input_ids.dtype, device=input_ids.device)
                ends_with_prefix = (input_ids[:, 1 - len(ids):] == prefix).all(-1)
                bias[:, ids[-1]] += ends_with_prefix.to(bias.dtype) * value
        return scores + bias


class PrefixConstrainedLogitsProcessor(LogitsProcessor):
    """Allow only the tokens `prefix_allowed_tokens_fn(batch_id, tokens_so_far)` returns, row by row."""

    def __init__(self, prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]], num_beams: int) -> None:
        self._prefix_allowed_tokens_fn, self._num_beams = prefix_allowed_tokens_fn, num_beams

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, -math.inf)
        for row, tokens in enumerate(input_ids):
            allowed = self._prefix_allowed_tokens_fn(row // self._num_beams, tokens)
            if len(allowed) == 0:
                raise ValueError(f"prefix_allowed_tokens_fn returned no allowed token for batch id "
                                 f"{row // self._num_beams} (row {row}): the constraint cannot be met; make it "
                                 "return at least one token id")
            mask[row, allowed] = 0
        return scores + mask


class EncoderRepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """The inverse of the repetition penalty, over the encoder's input: tokens present in `encoder_input_ids`
    become *more* likely (positive scores multiplied, negative ones divided, by `penalty`); with beams, row r uses
    encoder row r // num_beams."""

    def __init__(self, penalty: float, encoder_input_ids: torch.LongTensor) -> None:
        if not isinstance(penalty, float) or not penalty > 0:
            raise ValueError(f"penalty must be a float > 0, got {penalty!r}")
        self.penalty, self.encoder_input_ids = 1 / penalty, encoder_input_ids

    def __call__(self, input_ids, scores):
        ids = self.encoder_input_ids.to(scores.device)
        if scores.shape[0] > ids.shape[0]:  # beams: each encoder row serves num_beams consecutive rows
            ids = ids.repeat_interleave(scores.shape[0] // ids.shape[0], dim=0)
        picked = scores.gather(1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, ids, picked)


class EncoderNoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Forbid tokens that would repeat, in the output, an n-gram of the encoder's input (rows map to the encoder
    row `row // num_beams`)."""

    def __init__(self, encoder_ngram_size: int, encoder_input_ids: torch.LongTensor) -> None:
        if not isinstance(encoder_ngram_size, int) or encoder_ngram_size <= 0:
            raise ValueError(f"encoder_ngram_size must be a positive int, got {encoder_ngram_size!r}")
        self.ngram_size = encoder_ngram_size
        encoder_input_ids = encoder_input_ids.view(-1, encoder_input_ids.shape[-1])
        self.batch_size = encoder_input_ids.shape[0]
        self.next_tokens = [self._ngrams(row.tolist()) for row in encoder_input_ids]

    def _ngrams(self, tokens: list[int]) -> dict[tuple[int, ...], list[int]]:
        """prefix of n-1 tokens -> the tokens that followed it in `tokens`."""
        n, table = self.ngram_size, {}
        for start in range(len(tokens) - n + 1):
            table.setdefault(tuple(tokens[start:start + n - 1]), []).append(tokens[start + n - 1])
        return table

    def __call__(self, input_ids, scores):
        num_beams = scores.shape[0] // self.batch_size
        prefix_start = input_ids.shape[-1] + 1 - self.ngram_size
        out = scores.clone()
        for row in range(scores.shape[0]):
            prefix = tuple(input_ids[row, prefix_start:].tolist()) if prefix_start >= 0 else None
            banned = self.next_tokens[row // num_beams].get(prefix, []) if prefix is not None else []
            out[row, banned] = -math.inf
        return out


class ExponentialDecayLengthPenalty(LogitsProcessor):
    """After `start` generated tokens, raise the EOS scores by |score| * (factor ** (steps past start) - 1)."""

    def __init__(self, exponential_decay_length_penalty: tuple[int, float], eos_token_id,
                 input_ids_seq_length: int) -> None:
        start, self.regulation_factor = exponential_decay_length_penalty
        self.regulation_start = start + input_ids_seq_length
        self.eos_token_id = _token_ids(eos_token_id, None)

    def __call__(self, input_ids, scores):
        steps = input_ids.shape[-1] - self.regulation_start
        if steps <= 0:
            return scores
        eos = self.eos_token_id.to(scores.device)
        penalties = torch.zeros_like(scores)
        penalties[:, eos] = scores[:, eos].abs() * (self.regulation_factor ** steps - 1)
        return scores + penalties


class InfNanRemoveLogitsProcessor(LogitsProcessor):
    """NaN -> 0 and +-inf -> the dtype's largest/smallest finite value, so sampling cannot fail on them."""

    def __call__(self, input_ids, scores):
        return torch.nan_to_num(scores, nan=0.0)


class LogitNormalization(LogitsProcessor):
    """Scores -> log-probabilities (log-softmax), e.g. so beam scores compare across steps."""

    def __call__(self, input_ids, scores):
        return scores.log_softmax(-1)


class SuppressTokensAtBeginLogitsProcessor(LogitsProcessor):
    """Forbid `begin_suppress_tokens` at the first generated step (when the sequence has `begin_index` tokens)."""

    def __init__(self, begin_suppress_tokens, begin_index: int, device: str = "cpu") -> None:
        self.begin_suppress_tokens = torch.as_tensor(list(begin_suppress_tokens), dtype=torch.long, device=device)
        self.begin_index = begin_index

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != self.begin_index:
            return scores
        banned = torch.isin(torch.arange(scores.shape[-1], device=scores.device),
                            self.begin_suppress_tokens.to(scores.device))
        return scores.masked_fill(banned, -math.inf)
