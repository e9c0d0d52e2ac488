"""Watermarking processors and their configs: the green-list watermark (Kirchenbauer et al. 2023) and SynthID-Text
(Dathathri et al. 2024), with the reference's semantics so text watermarked by one library is detected by the other.

Green list: before each step a hash of the previous token(s) seeds a generator whose permutation of the vocabulary
picks `greenlist_ratio` of it; those tokens get `bias` added to their logits. The generator calls are the reference's
(a torch.Generator seeded with the hash key draws a 1_000_003-entry table, then each step's seed draws a vocabulary
permutation), so the same key gives the same green lists.

SynthID: each candidate continuation of the last `ngram_len - 1` tokens is hashed with every key (one per "depth")
into a g-value, a fair coin read from a fixed random table; the distribution is tilted towards g = 1 depth by depth
(tournament sampling in expectation). A context already seen (kept in a per-row history) is left unwatermarked.
Hashes are 64-bit linear congruential steps that wrap as int64 arithmetic does.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import torch

from loom.generation.logits_process import LogitsProcessor

_LCG_MULTIPLIER = 6364136223846793005
_TABLE_SIZE = 1_000_003  # the green-list scheme's fixed permutation table (a prime)


class _WatermarkingConfigBase:
    """Shared dict/JSON behaviour of the watermarking configs."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """A config from `config_dict`; kwargs naming a field override it, other kwargs are ignored."""
        config = cls(**config_dict)
        for key in [k for k in kwargs if hasattr(config, k)]:
            setattr(config, key, kwargs.pop(key))
        return config

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def to_json_string(self) -> str:
        return json.dumps(self.__dict__, indent=2) + "\n"

    def to_json_file(self, json_file_path) -> None:
        with open(json_file_path, "w", encoding="utf-8") as out:
            out.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def update(self, **kwargs: Any) -> None:
        """Set the fields among kwargs (others are ignored)."""
        for key, value in kwargs.items():
            if hasattr(self, key):
                setattr(self, key, value)

    def __iter__(self):
        yield from copy.deepcopy(self.__dict__).items()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    @staticmethod
    def _bad(key: str, expected: str, found: Any) -> ValueError:
        return ValueError(f"watermarking_config.{key} should be {expected}, got {found!r}")


class WatermarkingConfig(_WatermarkingConfigBase):
    """Settings of the green-list watermark (`GenerationConfig(watermarking_config=...)`)."""

    def __init__(self, greenlist_ratio: float = 0.25, bias: float = 2.0, hashing_key: int = 15485863,
                 seeding_scheme: str = "lefthash", context_width: int = 1) -> None:
        self.greenlist_ratio = greenlist_ratio
        self.bias = bias
        self.hashing_key = hashing_key
        self.seeding_scheme = seeding_scheme
        self.context_width = context_width

    def validate(self) -> None:
        if self.seeding_scheme not in ("selfhash", "lefthash"):
            raise self._bad("seeding_scheme", "'selfhash' or 'lefthash'", self.seeding_scheme)
        if not 0.0 <= self.greenlist_ratio <= 1.0:
            raise self._bad("greenlist_ratio", "in [0, 1]", self.greenlist_ratio)
        if not self.context_width >= 1:
            raise self._bad("context_width", "a positive integer", self.context_width)

    def construct_processor(self, vocab_size: int, device) -> "WatermarkLogitsProcessor":
        return WatermarkLogitsProcessor(vocab_size=vocab_size, device=device, greenlist_ratio=self.greenlist_ratio,
                                        bias=self.bias, hashing_key=self.hashing_key,
                                        seeding_scheme=self.seeding_scheme, context_width=self.context_width)


class SynthIDTextWatermarkingConfig(_WatermarkingConfigBase):
    """Settings of the SynthID-Text watermark: `keys` (one per depth) and the n-gram length it hashes."""

    def __init__(self, ngram_len: int, keys: list[int], context_history_size: int = 1024,
                 sampling_table_seed: int = 0, sampling_table_size: int = 2**16, skip_first_ngram_calls: bool = False,
                 debug_mode: bool = False) -> None:
        self.ngram_len = ngram_len
        self.keys = keys
        self.sampling_table_size = sampling_table_size
        self.sampling_table_seed = sampling_table_seed
        self.context_history_size = context_history_size
        self.skip_first_ngram_calls = skip_first_ngram_calls
        self.debug_mode = debug_mode

    def validate(self) -> None:
        if self.sampling_table_size > 2**24:
            raise self._bad("sampling_table_size", "<= 2**24", self.sampling_table_size)

    def construct_processor(self, vocab_size: int, device) -> "SynthIDTextWatermarkLogitsProcessor":
        return SynthIDTextWatermarkLogitsProcessor(
            ngram_len=self.ngram_len, keys=self.keys, sampling_table_size=self.sampling_table_size,
            sampling_table_seed=self.sampling_table_seed, context_history_size=self.context_history_size,
            device=device, skip_first_ngram_calls=self.skip_first_ngram_calls, debug_mode=self.debug_mode)


def watermarking_config_from(value):
    """A GenerationConfig's `watermarking_config` as a config object (a dict from JSON picks its class by keys)."""
    if isinstance(value, dict):
        return (SynthIDTextWatermarkingConfig if "ngram_len" in value else WatermarkingConfig).from_dict(value)
    return value


class WatermarkLogitsProcessor(LogitsProcessor):
    """Add `bias` to a pseudo-random green list of `greenlist_ratio * vocab_size` tokens seeded by the context.

    seeding_scheme "lefthash" seeds from the previous token; "selfhash" also from each candidate, keeping the greedy
    candidates (of the top 40) that fall in their own green list."""

    def __init__(self, vocab_size: int, device, greenlist_ratio: float = 0.25, bias: float = 2.0,
                 hashing_key: int = 15485863, seeding_scheme: str = "lefthash", context_width: int = 1) -> None:
        if seeding_scheme not in ("selfhash", "lefthash"):
            raise ValueError(f"seeding_scheme must be 'selfhash' or 'lefthash', got {seeding_scheme!r}")
        if not 0.0 < greenlist_ratio < 1.0:
            raise ValueError(f"greenlist_ratio must be strictly between 0 and 1, got {greenlist_ratio}")
        self.vocab_size = vocab_size
        self.greenlist_size = int(vocab_size * greenlist_ratio)
        self.bias = bias
        self.seeding_scheme = seeding_scheme
        self.hash_key = hashing_key
        self.context_width = context_width
        self.table_size = _TABLE_SIZE
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(hashing_key)
        self.fixed_table = torch.randperm(_TABLE_SIZE, generator=self.rng, device=device)

    def set_seed(self, input_seq: torch.LongTensor) -> None:
        context = input_seq[-self.context_width:]
        if self.seeding_scheme == "selfhash":
            left = self.fixed_table[context % self.table_size] + 1
            right = self.fixed_table[context[-1] % self.table_size] + 1
            seed = (self.hash_key * left * right).min().item()
        else:
            seed = self.hash_key * context[-1].item()
        self.rng.manual_seed(seed % (2**64 - 1))

    def _get_greenlist_ids(self, input_seq: torch.LongTensor) -> torch.LongTensor:
        self.set_seed(input_seq)
        permutation = torch.randperm(self.vocab_size, device=input_seq.device, generator=self.rng)
        return permutation[:self.greenlist_size]

    def _score_rejection_sampling(self, input_seq: torch.LongTensor, scores: torch.Tensor) -> torch.LongTensor:
        ranked = scores.argsort(dim=-1, descending=True)
        kept = [candidate for candidate in ranked[:40]
                if candidate in self._get_greenlist_ids(torch.cat([input_seq, candidate[None]]))]
        return torch.tensor(kept, dtype=torch.long, device=input_seq.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] < self.context_width:
            return scores  # too short to seed from: this step goes unwatermarked, as in the reference
        out = scores.clone()
        for row, sequence in enumerate(input_ids):
            if self.seeding_scheme == "selfhash":
                green = self._score_rejection_sampling(sequence, scores[row])
            else:
                green = self._get_greenlist_ids(sequence)
            out[row, green] += self.bias
        return out


class SynthIDTextWatermarkState:
    """Per-generation state: the last `ngram_len - 1` tokens of each row and the hashes of contexts seen."""

    def __init__(self, batch_size: int, ngram_len: int, context_history_size: int, device) -> None:
        self.context = torch.zeros((batch_size, ngram_len - 1), dtype=torch.int64, device=device)
        self.context_history = torch.zeros((batch_size, context_history_size), dtype=torch.int64, device=device)
        self.num_calls = 0


class SynthIDTextWatermarkLogitsProcessor(LogitsProcessor):
    """SynthID-Text: tilt each step's distribution towards continuations whose keyed n-gram hashes read g = 1.

    Returns log-probabilities. Contexts repeated within a row are left unwatermarked (their scores pass through)."""

    def __init__(self, ngram_len: int, keys: list[int], sampling_table_size: int, sampling_table_seed: int,
                 context_history_size: int, device, skip_first_ngram_calls: bool = False,
                 debug_mode: bool = False) -> None:
        self.ngram_len = ngram_len
        self.keys = torch.tensor(keys, device=device)
        generator = torch.Generator(device=device).manual_seed(sampling_table_seed)
        self.sampling_table = torch.randint(0, 2, (sampling_table_size,), generator=generator, device=device)
        self.context_history_size = context_history_size
        self.device = device
        self.state: SynthIDTextWatermarkState | None = None
        self.skip_first_ngram_calls = skip_first_ngram_calls
        self.debug_mode = debug_mode

    def _init_state(self, batch_size: int) -> None:
        self.state = SynthIDTextWatermarkState(batch_size, self.ngram_len, self.context_history_size, self.device)

    @staticmethod
    def accumulate_hash(current_hash: torch.LongTensor, data: torch.LongTensor,
                        multiplier: int = _LCG_MULTIPLIER, increment: int = 1) -> torch.LongTensor:
        """Fold `data`'s last dimension into `current_hash` (broadcast against data.shape[:-1]), one LCG step per
        element: h = (h + x) * multiplier + increment, wrapping in int64."""
        for i in range(data.shape[-1]):
            current_hash = (current_hash + data[..., i]) * multiplier + increment
        return current_hash

    def _hash_keys(self, hashes: torch.LongTensor) -> torch.LongTensor:
        """(...,) hashes -> (..., depth): each extended with one key."""
        return self.accumulate_hash(hashes[..., None], self.keys[..., None])

    def compute_ngram_keys(self, ngrams: torch.LongTensor) -> torch.LongTensor:
        """(batch, num_ngrams, ngram_len) -> keyed hashes (batch, num_ngrams, depth)."""
        if ngrams.dim() != 3 or ngrams.shape[2] != self.ngram_len:
            raise ValueError(f"ngrams must have shape (batch_size, num_ngrams, ngram_len={self.ngram_len}), got "
                             f"{tuple(ngrams.shape)}")
        start = torch.ones(ngrams.shape[:2], device=ngrams.device, dtype=torch.long)
        return self._hash_keys(self.accumulate_hash(start, ngrams))

    def _compute_keys(self, n_minus_1_grams: torch.LongTensor,
                      indices: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Keyed hashes of each context (batch, ngram_len - 1) continued by each of `indices` (batch, K):
        returns ((batch, K, depth), the context-only hashes (batch,))."""
        start = torch.ones(n_minus_1_grams.shape[0], device=n_minus_1_grams.device, dtype=torch.long)
        context_hash = self.accumulate_hash(start, n_minus_1_grams)
        continued = self.accumulate_hash(context_hash[:, None], indices[..., None])  # (B, K)
        return self._hash_keys(continued), context_hash

    def sample_g_values(self, ngram_keys: torch.LongTensor) -> torch.LongTensor:
        """Keyed hashes (batch, N, depth) -> g-values in {0, 1} read from the sampling table."""
        return self.sampling_table[ngram_keys % self.sampling_table.shape[0]]

    def update_scores(self, scores: torch.Tensor, g_values: torch.Tensor) -> torch.Tensor:
        """Tilt softmax(scores) (batch, vocab) by g-values (batch, vocab, depth); returns log-probabilities."""
        probs = torch.softmax(scores, dim=1)
        for depth in range(g_values.shape[2]):
            g = g_values[:, :, depth]
            probs = probs * (1 + g - (g * probs).sum(dim=1, keepdim=True))
        log_probs = torch.log(probs)
        return torch.where(torch.isfinite(log_probs), log_probs, torch.finfo(log_probs.dtype).min)

    @staticmethod
    def _check_input_ids_shape(input_ids: torch.LongTensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch_size, input_len), got {tuple(input_ids.shape)}")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self._check_input_ids_shape(input_ids)
        batch_size, vocab_size = scores.shape
        if self.debug_mode:
            scores = torch.ones_like(scores)
        if self.state is None:
            self._init_state(batch_size)
        else:  # slide the context window over the newest token
            self.state.context = torch.cat([self.state.context, input_ids[:, -1:]], dim=1)[:, 1:]
        self.state.num_calls += 1
        if self.skip_first_ngram_calls and self.state.num_calls < self.ngram_len:
            return scores
        candidates = torch.arange(vocab_size, device=self.device).expand(batch_size, -1)
        ngram_keys, context_hash = self._compute_keys(self.state.context, candidates)
        updated = self.update_scores(scores, self.sample_g_values(ngram_keys))
        context_hash = context_hash[:, None]
        repeated = (self.state.context_history == context_hash).any(dim=1, keepdim=True)
        self.state.context_history = torch.cat([context_hash, self.state.context_history], dim=1)[:, :-1]
        return torch.where(repeated, scores, updated)

    def compute_g_values(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """g-values of every n-gram of `input_ids` (batch, len): (batch, len - ngram_len + 1, depth)."""
        self._check_input_ids_shape(input_ids)
        return self.sample_g_values(self.compute_ngram_keys(input_ids.unfold(1, self.ngram_len, 1)))

    def compute_context_repetition_mask(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """(batch, len - ngram_len + 1): True where the n-gram's context was not seen earlier in the row."""
        self._check_input_ids_shape(input_ids)
        batch_size = input_ids.shape[0]
        history = torch.zeros((batch_size, self.context_history_size), dtype=torch.int64, device=input_ids.device)
        contexts = input_ids[:, :-1].unfold(1, self.ngram_len - 1, 1)
        start = torch.ones(batch_size, device=input_ids.device, dtype=torch.long)
        repeated = []
        for i in range(contexts.shape[1]):
            context_hash = self.accumulate_hash(start, contexts[:, i, :])[:, None]
            repeated.append((history == context_hash).any(dim=1, keepdim=True))
            history = torch.cat([context_hash, history], dim=1)[:, :-1]
        return torch.logical_not(torch.cat(repeated, dim=1))

    def compute_eos_token_mask(self, input_ids: torch.LongTensor, eos_token_id: int) -> torch.LongTensor:
        """(batch, len) booleans: True before each row's first `eos_token_id`, False from it on."""
        self._check_input_ids_shape(input_ids)
        return (input_ids == eos_token_id).long().cumsum(dim=1) == 0

    def expected_mean_g_value(self, vocab_size: int, coinflip_prob: float = 0.5) -> float:
        """The mean g-value watermarked text has in theory (one depth, a uniform model distribution)."""
        return coinflip_prob + coinflip_prob * (1 - coinflip_prob) * (1 - 1 / vocab_size)
