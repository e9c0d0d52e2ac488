"""BERT's multiple-choice, next-sentence and pretraining heads, RoBERTa (and its XLM-R / CamemBERT aliases) and
ELECTRA against the reference on tiny random checkpoints: every head's outputs on a padded batch, losses, and
save -> reference load round trips."""
from __future__ import annotations

import pytest
import torch

import loom
from loomtest import reference_checkpoint


def _ids(B=2, T=12, vocab=99, seed=1, low=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (B, T), generator=g)


def _assert_outputs_close(a, b, valid):
    """Every tensor output of the reference equals ours; per-token outputs on the tokens where `valid` (B, T)."""
    compared = 0
    for key in b.keys():
        if key in ("hidden_states", "attentions", "past_key_values") or b[key] is None:
            continue
        x, y = a[key], b[key]
        if y.dim() >= 2 and y.shape[:2] == valid.shape:
            x, y = x[valid], y[valid]
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")
        compared += 1
    assert compared, f"no tensor output compared in {list(b.keys())}"


BERT_NEW_HEADS = ["BertForMultipleChoice", "BertForNextSentencePrediction", "BertForPreTraining"]


@pytest.mark.parametrize("cls", BERT_NEW_HEADS)
def test_bert_new_heads_parity_and_loss(tmp_path_factory, cls):
    path, ref = reference_checkpoint(tmp_path_factory, "bert", cls)
    ours = getattr(loom, cls).from_pretrained(path)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    if cls == "BertForMultipleChoice":  # (B, C, T): three choices per example
        ids, mask, types = (torch.stack([t, t.roll(1, 0), t.flip(0)], 1) for t in (ids, mask, types))
        kwargs = dict(labels=torch.tensor([2, 0]))
    elif cls == "BertForNextSentencePrediction":
        kwargs = dict(labels=torch.tensor([1, 0]))
    else:
        kwargs = dict(labels=torch.where(ids % 3 == 0, ids, -100), next_sentence_label=torch.tensor([0, 1]))
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types, **kwargs)
        b = ref(ids, attention_mask=mask, token_type_ids=types, **kwargs)
    valid = mask.bool() if ids.dim() == 2 else torch.ones(2, 3, dtype=torch.bool)
    assert b.loss is not None
    _assert_outputs_close(a, b, valid)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", BERT_NEW_HEADS)
def test_bert_new_heads_auto_and_round_trip(tmp_path_factory, tmp_path, cls):
    import transformers

    path, ref = reference_checkpoint(tmp_path_factory, "bert", cls)
    auto = {"BertForMultipleChoice": "AutoModelForMultipleChoice",
            "BertForNextSentencePrediction": "AutoModelForNextSentencePrediction",
            "BertForPreTraining": "AutoModelForPreTraining"}[cls]
    ours = getattr(loom, auto).from_pretrained(path)
    assert type(ours).__name__ == cls
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    ids = _ids()
    if cls == "BertForMultipleChoice":
        ids = torch.stack([ids, ids.flip(0)], 1)
    with torch.no_grad():
        _assert_outputs_close(back(ids), ref(ids), torch.ones(ids.shape[:2], dtype=torch.bool))
