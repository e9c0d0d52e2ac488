"""Token-for-token parity with the reference's `generate` on tiny random checkpoints (fp32)."""
from __future__ import annotations

import pytest
import torch

from gen_helpers import model_pair, prompts

FAMILIES = ["llama", "gpt2", "mistral", "qwen2"]


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = model_pair(tmp_path_factory, model_type, pad_token_id=0)
        return cache[model_type]
    return get


def _both(pair, *args, seed=None, **kwargs):
    ours, ref = pair
    if seed is not None:
        torch.manual_seed(seed)
    a = ours.generate(*args, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        b = ref.generate(*args, **kwargs)
    return a, b


def _eos_from_greedy(pair, ids, mask, step=3):
    """A token the model emits early on, to use as EOS so that stopping paths are exercised."""
    out = pair[0].generate(ids, attention_mask=mask, max_new_tokens=step + 1)
    return int(out[0, ids.shape[1] + step])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_matches_reference(pairs, model_type):
    ids, mask = prompts([7, 4, 9])
    a, b = _both(pairs(model_type), ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_new_tokens",
                                  "suppress_tokens", "forced_eos_token_id", "several_eos", "max_length",
                                  "max_length_and_max_new_tokens", "sequence_bias", "exponential_decay_length_penalty",
                                  "encoder_repetition_penalty", "encoder_no_repeat_ngram_size",
                                  "begin_suppress_tokens"])
def test_greedy_processors_match_reference(pairs, name):
    """Each setting must change the plain greedy output (so it is exercised) and match the reference."""
    pair = pairs("llama")
    ids, mask = prompts([6, 9], seed=3)
    plain = pair[0].generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=2)
    new = plain[:, ids.shape[1]:]
    early_eos = int(new[0, 3])
    settings = {
        "repetition_penalty": dict(repetition_penalty=1.7),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
        "bad_words_ids": dict(bad_words_ids=[[int(new[0, 1])], new[1, 2:4].tolist(), [5, 6, 7]]),
        "min_new_tokens": dict(min_new_tokens=6, eos_token_id=early_eos),
        "suppress_tokens": dict(suppress_tokens=new[:, 0].tolist()),
        "forced_eos_token_id": dict(forced_eos_token_id=2),
        "several_eos": dict(eos_token_id=[2, early_eos, int(new[1, 5])]),
        "max_length": dict(max_length=15, max_new_tokens=None),
        "max_length_and_max_new_tokens": dict(max_length=30, max_new_tokens=5),
        "sequence_bias": dict(sequence_bias={(int(new[0, 1]),): -20.0, tuple(new[1, 2:4].tolist()): -20.0}),
        "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(2, 4.0), eos_token_id=early_eos),
        "encoder_repetition_penalty": dict(encoder_repetition_penalty=5.0),
        "encoder_no_repeat_ngram_size": dict(encoder_no_repeat_ngram_size=1),
        "begin_suppress_tokens": dict(begin_suppress_tokens=new[:, 0].tolist()),
    }[name]
    kwargs = {"attention_mask": mask, "max_new_tokens": 12, "eos_token_id": 2, **settings}
    a, b = _both(pair, ids, **{k: v for k, v in kwargs.items() if v is not None})
    assert torch.equal(a, b)
    assert a.shape != plain.shape or not torch.equal(a, plain), f"{name} did not change the output"


def test_forced_bos_matches_reference(pairs):
    ids = torch.tensor([[1]])
    a, b = _both(pairs("gpt2"), ids, max_new_tokens=5, forced_bos_token_id=7)
    assert torch.equal(a, b) and a[0, 1] == 7


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("settings", [
    dict(num_beams=3),
    dict(num_beams=4, num_return_sequences=3, length_penalty=0.5),
    dict(num_beams=3, early_stopping=True, length_penalty=2.0),
    dict(num_beams=2, early_stopping="never"),
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_beam_search_matches_reference(pairs, model_type, settings):
    pair = pairs(model_type)
    ids, mask = prompts([5, 8], seed=4)
    eos = _eos_from_greedy(pair, ids, mask, step=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=eos, do_sample=False,
                  return_dict_in_generate=True, output_scores=True, **settings)
    a, b = _both(pair, ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.beam_indices, b.beam_indices.to(a.beam_indices.dtype))


@pytest.mark.parametrize("settings", [
    dict(top_k=10), dict(top_p=0.8, temperature=0.7), dict(min_p=0.05, top_k=0), dict(typical_p=0.9),
    dict(top_k=20, top_p=0.9, repetition_penalty=1.3), dict(epsilon_cutoff=0.02, top_k=0),
    dict(eta_cutoff=0.01, top_k=0), dict(top_h=0.5, top_k=0, renormalize_logits=True),
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_seeded_sampling_matches_reference(pairs, settings):
    ids, mask = prompts([6, 3], seed=5)
    a, b = _both(pairs("llama"), ids, attention_mask=mask, do_sample=True, max_new_tokens=10, seed=123,
                 return_dict_in_generate=True, output_scores=True, **settings)
    # same draws in the same order from the same distributions
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(torch.isinf(x), torch.isinf(y))  # same tokens filtered out
        torch.testing.assert_close(x.softmax(-1), y.softmax(-1), atol=1e-6, rtol=1e-5)


def test_beam_sampling_matches_reference(pairs):
    ids, mask = prompts([6, 3], seed=6)
    a, b = _both(pairs("llama"), ids, attention_mask=mask, do_sample=True, num_beams=3, max_new_tokens=8, seed=7,
                 top_k=15)
    assert torch.equal(a, b)


def test_greedy_scores_match_reference(pairs):
    ids, mask = prompts([6, 3], seed=8)
    a, b = _both(pairs("gpt2"), ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True,
                 output_scores=True, output_logits=True, repetition_penalty=1.2)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores + a.logits, b.scores + b.logits):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_default_length_matches_reference(pairs):
    ids, _ = prompts([5], seed=9)
    a, b = _both(pairs("llama"), ids)  # no length given: 20 new tokens
    assert torch.equal(a, b) and a.shape[1] == 25
