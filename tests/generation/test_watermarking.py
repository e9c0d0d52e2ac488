"""Watermarking: the green-list and SynthID-Text processors against the reference's on the same inputs (the same
green lists, g-values and processed scores), their configs through GenerationConfig's JSON, and watermarked
generate() token for token against the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as ref_lp

import loom
from loom.generation.watermarking import (SynthIDTextWatermarkingConfig, SynthIDTextWatermarkLogitsProcessor,
                                          WatermarkingConfig, WatermarkLogitsProcessor)

from gen_helpers import model_pair, prompts


def _ids(batch, length, vocab, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme,width", [("lefthash", 1), ("lefthash", 3), ("selfhash", 1), ("selfhash", 4)])
def test_green_list_matches_reference(scheme, width):
    ids, scores = _ids(3, 6, 50), torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    settings = dict(vocab_size=50, device="cpu", greenlist_ratio=0.3, bias=1.5, hashing_key=77,
                    seeding_scheme=scheme, context_width=width)
    ours, ref = WatermarkLogitsProcessor(**settings), ref_lp.WatermarkLogitsProcessor(**settings)
    got = ours(ids, scores)
    torch.testing.assert_close(got, ref(ids, scores), rtol=0, atol=0)
    assert not torch.equal(got, scores)  # some tokens did get the bias
    assert ours.greenlist_size == 15 and ours.hash_key == 77


def test_green_list_skips_a_context_shorter_than_its_width():
    scores = torch.randn(2, 20)
    out = WatermarkLogitsProcessor(20, "cpu", context_width=4)(_ids(2, 3, 20), scores)
    assert torch.equal(out, scores)


def test_green_list_bad_arguments_are_named():
    with pytest.raises(ValueError, match="seeding_scheme must be 'selfhash' or 'lefthash', got 'hash'"):
        WatermarkLogitsProcessor(20, "cpu", seeding_scheme="hash")
    with pytest.raises(ValueError, match="greenlist_ratio must be strictly between 0 and 1, got 1.2"):
        WatermarkLogitsProcessor(20, "cpu", greenlist_ratio=1.2)


def _synthid_pair(**overrides):
    settings = dict(ngram_len=4, keys=[654, 400, 836], sampling_table_size=2**12, sampling_table_seed=3,
                    context_history_size=16, device="cpu", **overrides)
    return SynthIDTextWatermarkLogitsProcessor(**settings), ref_lp.SynthIDTextWatermarkLogitsProcessor(**settings)


def test_synthid_hashes_and_g_values_match_reference():
    ours, ref = _synthid_pair()
    ids = _ids(5, 12, 10**9, seed=2)  # large ids so that the int64 hash arithmetic wraps
    torch.testing.assert_close(ours.compute_g_values(ids), ref.compute_g_values(ids), rtol=0, atol=0)
    ngrams = ids.unfold(1, 4, 1)
    assert torch.equal(ours.compute_ngram_keys(ngrams), ref.compute_ngram_keys(ngrams))
    indices = _ids(5, 7, 100, seed=3)
    for a, b in zip(ours._compute_keys(ids[:, :3], indices), ref._compute_keys(ids[:, :3], indices)):
        assert torch.equal(a, b)
    assert torch.equal(ours.sampling_table, ref.sampling_table)
    repeated = torch.tensor([[1, 2, 3, 9, 1, 2, 3, 5, 7, 1, 2, 3, 4]])
    assert torch.equal(ours.compute_context_repetition_mask(repeated), ref.compute_context_repetition_mask(repeated))
    assert not ours.compute_context_repetition_mask(repeated).all()  # the repeated context is found
    eos = torch.tensor([[4, 2, 7, 2], [4, 5, 6, 7]])
    assert torch.equal(ours.compute_eos_token_mask(eos, 2), ref.compute_eos_token_mask(eos, 2))
    assert ours.expected_mean_g_value(100) == ref.expected_mean_g_value(100)


@pytest.mark.parametrize("skip_first", [False, True])
def test_synthid_scores_over_steps_match_reference(skip_first):
    ours, ref = _synthid_pair(skip_first_ngram_calls=skip_first)
    ids = _ids(3, 4, 30, seed=4)
    for step in range(7):  # past ngram_len, and the same context twice (rows whose token repeats)
        scores = torch.randn(3, 30, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        got, want = ours(ids, scores), ref(ids, scores)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        ids = torch.cat([ids, torch.full((3, 1), step % 2)], dim=1)
    assert ours.state.num_calls == ref.state.num_calls == 7
    assert torch.equal(ours.state.context_history, ref.state.context_history)


def test_synthid_tilts_the_distribution_towards_g_equal_one():
    processor, _ = _synthid_pair()
    flat = torch.zeros(1, 8, dtype=torch.float64)
    probs = processor(torch.tensor([[1, 2, 3]]), flat).exp()
    g = processor.sample_g_values(processor._compute_keys(torch.zeros(1, 3, dtype=torch.long),
                                                          torch.arange(8)[None])[0])
    favoured = g.sum(-1)[0]
    assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert probs[0, favoured.argmax()] > probs[0, favoured.argmin()]


def test_synthid_rejects_bad_shapes():
    processor, _ = _synthid_pair()
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch_size, input_len\), got \(4,\)"):
        processor.compute_g_values(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ngram_len=4"):
        processor.compute_ngram_keys(torch.zeros(1, 2, 3, dtype=torch.long))


def test_watermarking_configs_round_trip_through_generation_config(tmp_path):
    green = WatermarkingConfig(bias=2.5, greenlist_ratio=0.5, hashing_key=10, context_width=2)
    loom.GenerationConfig(watermarking_config=green).save_pretrained(tmp_path / "green")
    loaded = loom.GenerationConfig.from_pretrained(tmp_path / "green")
    assert isinstance(loaded.watermarking_config, WatermarkingConfig) and loaded.watermarking_config == green
    # and the reference reads what loom wrote
    ref = transformers.GenerationConfig.from_pretrained(tmp_path / "green")
    assert ref.watermarking_config.to_dict() == green.to_dict()

    synthid = SynthIDTextWatermarkingConfig(ngram_len=5, keys=[1, 2, 3])
    transformers.GenerationConfig(watermarking_config=transformers.SynthIDTextWatermarkingConfig(
        ngram_len=5, keys=[1, 2, 3])).save_pretrained(tmp_path / "synthid")
    loaded = loom.GenerationConfig.from_pretrained(tmp_path / "synthid")
    assert isinstance(loaded.watermarking_config, SynthIDTextWatermarkingConfig)
    assert loaded.watermarking_config.to_dict() == synthid.to_dict()
    assert isinstance(loaded.watermarking_config.construct_processor(50, "cpu"), SynthIDTextWatermarkLogitsProcessor)


def test_watermarking_config_validation_names_the_key():
    with pytest.raises(ValueError, match="watermarking_config.seeding_scheme"):
        loom.GenerationConfig(watermarking_config=WatermarkingConfig(seeding_scheme="other")).validate()
    with pytest.raises(ValueError, match="watermarking_config.sampling_table_size"):
        loom.GenerationConfig(watermarking_config={"ngram_len": 2, "keys": [1],
                                                   "sampling_table_size": 2**25}).validate()


def test_assistant_ensemble_weight_is_kept_and_validated():
    assert loom.GenerationConfig().assistant_ensemble_weight is None
    config = loom.GenerationConfig(assistant_ensemble_weight=0.7)
    assert loom.GenerationConfig.from_dict(config.to_dict()).assistant_ensemble_weight == 0.7
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="assistant_ensemble_weight must be strictly between 0 and 1"):
            loom.GenerationConfig(assistant_ensemble_weight=bad).validate()


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return model_pair(tmp_path_factory, "llama", pad_token_id=0)


@pytest.mark.parametrize("which", ["green", "synthid"])
def test_watermarked_generate_matches_reference(llama_pair, which):
    ours, ref = llama_pair
    ids, mask = prompts([6, 4])
    if which == "green":
        ours_cfg, ref_cfg = (lib.WatermarkingConfig(bias=4.0, context_width=2) for lib in (loom, transformers))
    else:
        ours_cfg, ref_cfg = (lib.SynthIDTextWatermarkingConfig(ngram_len=3, keys=[5, 9, 11])
                             for lib in (loom, transformers))
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=10)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, watermarking_config=ours_cfg)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=10, watermarking_config=ref_cfg)
    assert torch.equal(got, want)
    if which == "green":
        assert not torch.equal(got, plain)  # the bias changed the greedy tokens


def test_numpy_keys_are_accepted():
    keys = np.random.default_rng(0).integers(0, 2**16, size=(3,))
    processor = SynthIDTextWatermarkLogitsProcessor(ngram_len=3, keys=keys, sampling_table_size=2**10,
                                                    sampling_table_seed=0, context_history_size=8, device="cpu")
    assert processor.compute_g_values(_ids(2, 6, 100)).shape == (2, 4, 3)
