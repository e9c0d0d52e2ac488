"""GPT2DoubleHeadsModel against the reference on a tiny checkpoint: LM and multiple-choice logits and both losses,
with a choices dimension and without, and the summary variants of GPT2SequenceSummary."""
from __future__ import annotations

import pytest
import torch

import loom
from loomtest import reference_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "gpt2", "GPT2DoubleHeadsModel")
    return loom.GPT2DoubleHeadsModel.from_pretrained(path).eval(), ref


def _inputs(B=2, C=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (B, C, T), generator=g)
    mask = torch.ones(B, C, T, dtype=torch.long)
    mask[0, :, :2] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.randint(0, 99, (B, C, T), generator=g),
                mc_token_ids=torch.randint(0, T, (B, C), generator=g), labels=ids.clone(),
                mc_labels=torch.randint(0, C, (B,), generator=g))


def test_double_heads_match_reference(pair):
    ours, ref = pair
    inputs = _inputs()
    with torch.no_grad():
        a, b = ours(**inputs), ref(**inputs)
    assert a.logits.shape == (2, 3, 7, 99) and a.mc_logits.shape == (2, 3)
    for name in ("logits", "mc_logits", "loss", "mc_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)


def test_default_choice_token_is_the_last_and_2d_inputs_work(pair):
    ours, ref = pair
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), ref(ids)
    torch.testing.assert_close(a.mc_logits, b.mc_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_double_heads_generate_like_the_lm_head(pair):
    ours, ref = pair
    ids = torch.randint(3, 99, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, max_new_tokens=6, pad_token_id=0),
                           ref.generate(ids, max_new_tokens=6, pad_token_id=0))


@pytest.mark.parametrize("summary_type", ["last", "first", "mean"])
def test_summary_types_match_reference(tmp_path_factory, summary_type):
    path, ref = reference_checkpoint(tmp_path_factory, "gpt2", "GPT2DoubleHeadsModel", summary_type=summary_type,
                                     summary_activation="tanh", summary_proj_to_labels=False)
    ours = loom.GPT2DoubleHeadsModel.from_pretrained(path).eval()
    inputs = {k: v for k, v in _inputs(seed=3).items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).mc_logits, ref(**inputs).mc_logits, atol=1e-5, rtol=1e-5)


def test_unknown_summary_type_is_named():
    config = loom.GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, summary_type="attn")
    with pytest.raises(ValueError, match="summary_type='attn' is not supported"):
        loom.GPT2DoubleHeadsModel(config)


@pytest.mark.parametrize("model_type,cls", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_shift_labels_are_used_unshifted_like_the_reference(tmp_path_factory, model_type, cls):
    """Sequence/context parallel training hands the LM head pre-shifted targets; the loss must use them as given."""
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls)
    ours = getattr(loom, cls).from_pretrained(path).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 99, (2, 6), generator=g)
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    other = torch.randint(3, 99, (2, 6), generator=g)
    with torch.no_grad():
        a = ours(ids, labels=ids, shift_labels=other).loss
        torch.testing.assert_close(a, ref(ids, labels=ids, shift_labels=other).loss, atol=1e-5, rtol=1e-5)
        # the usual shift of labels gives the same loss as handing over the shifted targets
        torch.testing.assert_close(ours(ids, labels=ids).loss, ours(ids, labels=other, shift_labels=shifted).loss)
        assert ours(ids, shift_labels=other).loss is None  # as in the reference: no labels, no loss
