"""ConfidenceCriteria, validate_stopping_criteria and GenerationConfig round trips, against the reference."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
import transformers.generation as reference

import loom.generation as ours


@pytest.mark.parametrize("logit", [10.0, -10.0])
def test_confidence_criteria_matches_reference(logit):
    input_ids = torch.tensor([[3, 8, 5]])
    scores = (torch.randn(1, 12, generator=torch.Generator().manual_seed(0)),)
    scores[0][0, 5] = logit
    got = ours.ConfidenceCriteria(0.5)(input_ids, scores)
    assert got == reference.ConfidenceCriteria(0.5)(input_ids, scores) == (logit < 0)


@pytest.mark.parametrize("criteria_length,max_length", [(None, 11), (10, 10), (10, 11)])
def test_validate_stopping_criteria_matches_reference(criteria_length, max_length):
    def run(module):
        given = module.StoppingCriteriaList([module.MaxLengthCriteria(criteria_length)] if criteria_length else [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = module.validate_stopping_criteria(given, max_length)
        assert out is not given and len(given) == (1 if criteria_length else 0)  # a copy; the input is untouched
        return [type(c).__name__ for c in out], out.max_length, [w.category for w in caught]

    assert run(ours) == run(reference)


@pytest.mark.parametrize("file_name", [None, "foo.json"])
def test_generation_config_round_trip_with_new_fields(tmp_path, file_name):
    settings = dict(do_sample=True, temperature=0.7, sequence_bias=[[[45, 67], -0.6], [[89], 1.2]],
                    epsilon_cutoff=0.05, eta_cutoff=0.01, top_h=0.4, encoder_repetition_penalty=1.3,
                    encoder_no_repeat_ngram_size=2, exponential_decay_length_penalty=[5, 1.5],
                    remove_invalid_values=True, renormalize_logits=True)
    ours.GenerationConfig(**settings).save_pretrained(tmp_path / "ours", config_name=file_name)
    name = file_name or "generation_config.json"
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "ours", config_file_name=name)
    back = ours.GenerationConfig.from_pretrained(tmp_path / "ours", config_name=file_name)
    for key, value in settings.items():
        assert getattr(theirs, key) == value and getattr(back, key) == value, key
    assert ours.GenerationConfig().top_h is None and ours.GenerationConfig().sequence_bias is None


def test_cache_implementations_are_a_subset_of_the_reference():
    from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS as reference

    from loom.generation.config import ALL_CACHE_IMPLEMENTATIONS

    assert set(ALL_CACHE_IMPLEMENTATIONS) <= set(reference)
    for name in ALL_CACHE_IMPLEMENTATIONS:
        ours.GenerationConfig(cache_implementation=name).validate()
    with pytest.raises(ValueError, match="offloaded"):
        ours.GenerationConfig(cache_implementation="offloaded").validate()


@pytest.mark.parametrize("kwargs,assistant", [
    ({}, None), ({"do_sample": True}, None), ({"num_beams": 2}, None), ({"num_beams": 3, "do_sample": True}, None),
    ({"top_k": 10, "penalty_alpha": 0.6}, None), ({"top_k": 10, "penalty_alpha": 0.6, "do_sample": True}, None),
    ({"num_beams": 4, "num_beam_groups": 2}, None), ({"num_beams": 2, "force_words_ids": [[1]]}, None),
    ({}, "an assistant"), ({"do_sample": True}, "an assistant"), ({"num_beams": 2}, "an assistant"),
    ({"prompt_lookup_num_tokens": 3}, None), ({"dola_layers": "low"}, None), ({"dola_layers": "low"}, "x"),
])
def test_generation_mode_matches_reference(kwargs, assistant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = reference.GenerationConfig(**kwargs).get_generation_mode(assistant_model=assistant)
    got = ours.GenerationConfig(**kwargs).get_generation_mode(assistant_model=assistant)
    assert isinstance(got, ours.GenerationMode) and got.value == want.value
    assert ours.GenerationConfig(cache_implementation="static").cache_config is None
