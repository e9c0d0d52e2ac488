"""Every logits processor and warper loom exports, against the reference class of the same name: the same
constructor arguments (positional order and `device=` included) give the same scores on the same inputs, and the
same bad arguments raise ValueError."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

import loom

ENCODER_IDS = torch.tensor([[1, 2, 3, 1, 2, 4], [5, 5, 6, 7, 5, 6]])


def allowed_tokens(batch_id, tokens):
    return [batch_id, int(tokens[-1]) % 9, 3]


# (class name, positional args, keyword args)
CASES = [
    ("MinLengthLogitsProcessor", (8, [0, 2]), {"device": "cpu"}),
    ("MinNewTokensLengthLogitsProcessor", (3, 5, 1), {"device": "cpu"}),
    ("RepetitionPenaltyLogitsProcessor", (1.7,), {}),
    ("RepetitionPenaltyLogitsProcessor", (1.7,), {"prompt_ignore_length": 3}),
    ("NoRepeatNGramLogitsProcessor", (2,), {}),
    ("NoBadWordsLogitsProcessor", ([[4], [1, 2]],), {"eos_token_id": 0}),
    ("ForcedEOSTokenLogitsProcessor", (6, 2), {"device": "cpu"}),
    ("SuppressTokensLogitsProcessor", ([1, 7],), {"device": "cpu"}),
    ("TemperatureLogitsWarper", (0.6,), {}),
    ("TopKLogitsWarper", (3, 0.0, 4), {}),
    ("TopPLogitsWarper", (0.7, -5.0, 2), {}),
    ("MinPLogitsWarper", (0.2, 0.0, 3), {}),
    ("TypicalLogitsWarper", (0.6, -1.0, 2), {}),
    ("EpsilonLogitsWarper", (0.08,), {}),
    ("EpsilonLogitsWarper", (0.2, 0.0, 3), {}),
    ("EtaLogitsWarper", (0.09,), {"device": "cpu"}),
    ("EtaLogitsWarper", (0.3, 0.0, 2), {}),
    ("TopHLogitsWarper", (0.4,), {}),
    ("SequenceBiasLogitsProcessor", ({(3,): -2.5, (1, 2): 4.0, (2, 5, 6): 1.5, (7, 7): -1.0},), {}),
    ("SequenceBiasLogitsProcessor", ([[[3], 2.0], [[5, 6], -3.0]],), {}),
    ("PrefixConstrainedLogitsProcessor", (allowed_tokens, 2), {}),
    ("EncoderRepetitionPenaltyLogitsProcessor", (1.5,), {"encoder_input_ids": ENCODER_IDS}),
    ("EncoderNoRepeatNGramLogitsProcessor", (2,), {"encoder_input_ids": ENCODER_IDS}),
    ("EncoderNoRepeatNGramLogitsProcessor", (3,), {"encoder_input_ids": ENCODER_IDS}),
    ("ExponentialDecayLengthPenalty", ((2, 1.3), [4, 0], 3), {}),
    ("InfNanRemoveLogitsProcessor", (), {}),
    ("LogitNormalization", (), {}),
    ("SuppressTokensAtBeginLogitsProcessor", ([2, 5], 7), {"device": "cpu"}),
    ("SuppressTokensAtBeginLogitsProcessor", ([2, 5], 2), {}),
]


def _inputs(rows: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 9, (rows, length), generator=g)
    input_ids[:, -2:] = torch.tensor([1, 2])  # makes the n-gram and sequence-bias prefixes fire
    scores = torch.randn(rows, 9, generator=g) * 3
    scores[0, 4] = math.inf
    scores[-1, 1] = -math.inf
    scores[1, 0] = math.nan if rows > 2 else scores[1, 0]
    return input_ids, scores


@pytest.mark.parametrize("name,args,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("length", [2, 7])
def test_same_scores_as_reference(name, args, kwargs, length):
    input_ids, scores = _inputs(4, length, seed=length)
    if name != "InfNanRemoveLogitsProcessor":
        scores = scores.nan_to_num(nan=0.5, posinf=9.0, neginf=-9.0)
    ours = getattr(loom, name)(*args, **kwargs)
    theirs = getattr(transformers, name)(*args, **kwargs)
    before = scores.clone()
    got = ours(input_ids, scores)
    torch.testing.assert_close(got, theirs(input_ids.clone(), scores.clone()), equal_nan=True)
    torch.testing.assert_close(scores, before, equal_nan=True)  # the input is never modified


BAD_ARGUMENTS = [
    ("EpsilonLogitsWarper", (1.0,), "epsilon_cutoff"),
    ("EpsilonLogitsWarper", (0.1, -math.inf, 0), "min_tokens_to_keep"),
    ("EtaLogitsWarper", (0.0,), "eta_cutoff"),
    ("TopHLogitsWarper", (1.5,), "top_h"),
    ("SequenceBiasLogitsProcessor", ({},), "non-empty"),
    ("SequenceBiasLogitsProcessor", ({(1, 2): 1},), "floats"),
    ("SequenceBiasLogitsProcessor", ({3: 1.0},), "tuples"),
    ("SequenceBiasLogitsProcessor", ([[[-1], 1.0]],), "non-negative token ids"),
    ("EncoderRepetitionPenaltyLogitsProcessor", (2, ENCODER_IDS), "penalty"),
    ("EncoderNoRepeatNGramLogitsProcessor", (0, ENCODER_IDS), "encoder_ngram_size"),
    ("ExponentialDecayLengthPenalty", ((2, 1.3), [-1], 3), "non-negative"),
    ("MinLengthLogitsProcessor", (-1, 0), "min_length"),
    ("TopPLogitsWarper", (1.5,), "top_p"),
]


@pytest.mark.parametrize("name,args,message", BAD_ARGUMENTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_value_error_like_reference(name, args, message):
    with pytest.raises(ValueError):
        getattr(transformers, name)(*args)
    with pytest.raises(ValueError, match=message):
        getattr(loom, name)(*args)


def test_call_time_errors():
    input_ids, scores = _inputs(2, 4, seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary of size 9"):
        loom.SequenceBiasLogitsProcessor({(12,): 1.0})(input_ids, scores)
    with pytest.raises(ValueError, match="no allowed token"):
        loom.PrefixConstrainedLogitsProcessor(lambda batch_id, tokens: [], 1)(input_ids, scores)


def test_public_attributes_match_reference():
    """The attributes the reference's own tests read back after a GenerationConfig round trip."""
    for module in (loom, transformers):
        assert module.NoRepeatNGramLogitsProcessor(3).ngram_size == 3
        assert module.EncoderNoRepeatNGramLogitsProcessor(2, ENCODER_IDS).ngram_size == 2
        assert list(module.NoBadWordsLogitsProcessor([[1, 2], [4]], eos_token_id=4).bad_word_ids) == [[1, 2], [4]]
        assert list(module.SuppressTokensLogitsProcessor([1, 7]).suppress_tokens) == [1, 7]
        assert module.PrefixConstrainedLogitsProcessor(allowed_tokens, 3)._num_beams == 3
        assert module.SequenceBiasLogitsProcessor([[[5, 6], -3.0]]).sequence_bias == {(5, 6): -3.0}
