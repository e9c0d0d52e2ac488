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


def _encoder_heads(*model_types):
    from loom.auto import model_table

    return [(t, cls.__name__) for t in model_types for cls in model_table()[t][1].values()]


def _padded_batch(pad_id: int):
    """Row 0 left-padded by 3, row 1 right-padded by 4, pad tokens set to `pad_id` (RoBERTa counts positions over
    the non-pad ids, so the pad id matters)."""
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, 8:] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


def _head_inputs(cls: str, ids, mask):
    """The inputs (multiple choice: (B, C, T)) and labels of a head, and which outputs rows are real tokens."""
    valid = mask.bool()
    if "MultipleChoice" in cls:
        ids, mask = (torch.stack([t, t.flip(0), t.roll(3, 1)], 1) for t in (ids, mask))
        return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([2, 0])), torch.ones(2, 3).bool()
    labels = {"MaskedLM": dict(labels=torch.where((ids % 3 == 0) & valid, ids, -100)),
              "SequenceClassification": dict(labels=torch.tensor([0, 2])),
              "TokenClassification": dict(labels=torch.where(valid, ids % 3, -100)),
              "QuestionAnswering": dict(start_positions=torch.tensor([4, 3]), end_positions=torch.tensor([6, 40])),
              "PreTraining": dict(labels=(ids % 2).float()), "Model": {}}
    extra = next(v for k, v in labels.items() if cls.endswith(k) or k in cls)
    return dict(input_ids=ids, attention_mask=mask, **extra), valid


def _num_labels(cls: str) -> int:
    return 2 if "QuestionAnswering" in cls else 3


ROBERTA_HEADS = _encoder_heads("roberta", "xlm-roberta", "camembert")


@pytest.mark.parametrize("model_type,cls", ROBERTA_HEADS)
def test_roberta_family_parity_and_loss(tmp_path_factory, model_type, cls):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, num_labels=_num_labels(cls))
    ours = getattr(loom, cls).from_pretrained(path)
    inputs, valid = _head_inputs(cls, *_padded_batch(ref.config.pad_token_id))
    with torch.no_grad():
        a, b = ours(**inputs), ref(**inputs)
    _assert_outputs_close(a, b, valid)
    if cls.endswith("Model"):
        assert a.pooler_output is not None
    else:
        torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,cls", [r for r in ROBERTA_HEADS if r[0] == "roberta"])
def test_roberta_save_then_reference_load(tmp_path_factory, tmp_path, model_type, cls):
    import transformers

    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, num_labels=_num_labels(cls))
    getattr(loom, cls).from_pretrained(path).save_pretrained(tmp_path)
    back = getattr(transformers, cls).from_pretrained(tmp_path).eval()
    inputs, valid = _head_inputs(cls, *_padded_batch(1))
    with torch.no_grad():
        _assert_outputs_close(back(**inputs), ref(**inputs), valid)


def test_roberta_positions_from_inputs_embeds_and_length_limit(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "roberta", "RobertaModel")
    ours = loom.RobertaModel.from_pretrained(path)
    embeds = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs_embeds=embeds).last_hidden_state,
                                   ref(inputs_embeds=embeds).last_hidden_state, atol=1e-4, rtol=1e-4)
        ours(_ids(T=62))  # 62 tokens fill positions 2..63
        with pytest.raises(ValueError, match="63 tokens is longer than RoBERTa's 62 positions.*max_position_embeddings"):
            ours(_ids(T=63))


def test_roberta_mlm_ties_decoder_to_embeddings_and_bias(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "roberta", "RobertaForMaskedLM")
    ours = loom.AutoModelForMaskedLM.from_pretrained(path)
    assert ours.lm_head.decoder.weight is ours.roberta.embeddings.word_embeddings.weight
    assert ours.lm_head.decoder.bias is ours.lm_head.bias
    assert type(loom.AutoModelForMultipleChoice.from_pretrained(
        reference_checkpoint(tmp_path_factory, "xlm-roberta", "XLMRobertaForMultipleChoice")[0])).__name__ == \
        "XLMRobertaForMultipleChoice"


ELECTRA_HEADS = _encoder_heads("electra")


@pytest.mark.parametrize("embedding_size", [16, 32])
@pytest.mark.parametrize("cls", [c for _, c in ELECTRA_HEADS])
def test_electra_parity_loss_and_round_trip(tmp_path_factory, tmp_path, cls, embedding_size):
    import transformers

    path, ref = reference_checkpoint(tmp_path_factory, "electra", cls, num_labels=_num_labels(cls),
                                     embedding_size=embedding_size)
    ours = getattr(loom, cls).from_pretrained(path)
    base = ours if cls == "ElectraModel" else ours.electra
    assert hasattr(base, "embeddings_project") == (embedding_size != 32)
    inputs, valid = _head_inputs(cls, *_padded_batch(0))
    inputs["token_type_ids"] = (torch.arange(inputs["input_ids"].shape[-1]) >= 6).long().expand_as(inputs["input_ids"])
    with torch.no_grad():
        a, b = ours(**inputs), ref(**inputs)
    _assert_outputs_close(a, b, valid)
    if not cls.endswith("Model"):
        torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, cls).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        _assert_outputs_close(back(**inputs), b, valid)


@pytest.mark.parametrize("summary_type", ["last", "mean"])
def test_electra_multiple_choice_summary_types(tmp_path_factory, summary_type):
    path, ref = reference_checkpoint(tmp_path_factory, "electra", "ElectraForMultipleChoice",
                                     summary_type=summary_type, summary_proj_to_labels=False)
    ours = loom.AutoModelForMultipleChoice.from_pretrained(path)
    inputs, valid = _head_inputs("ElectraForMultipleChoice", *_padded_batch(0))
    with torch.no_grad():
        _assert_outputs_close(ours(**inputs), ref(**inputs), valid)


def test_electra_bad_summary_type_is_named(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "electra", "ElectraModel")
    config = loom.AutoConfig.from_pretrained(path)
    config.summary_type = "attn"
    with pytest.raises(ValueError, match="summary_type='attn' is not supported by loom"):
        loom.ElectraForMultipleChoice(config)


def test_electra_generator_ties_lm_head_to_embeddings(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "electra", "ElectraForMaskedLM")
    ours = loom.AutoModelForMaskedLM.from_pretrained(path)
    assert ours.generator_lm_head.weight is ours.electra.embeddings.word_embeddings.weight
    assert type(loom.AutoModelForPreTraining.from_pretrained(
        reference_checkpoint(tmp_path_factory, "electra", "ElectraForPreTraining")[0])).__name__ == \
        "ElectraForPreTraining"
