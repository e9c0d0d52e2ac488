"""The model and config surface the reference's own model tests read (issue 20), each against the reference where it
has a value: the MODEL_FOR_*_MAPPING tables and get_values, base_model, init_weights, _from_config, the 5.x
activation-checkpointing names and a config's gradient_checkpointing, tp_plan, to_diff_dict, loading info as sets,
resize's vocab_size, output_hidden_states from the config, and a causal LM's pre-shifted labels."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.auto import get_values
from loomtest import TINY, reference_checkpoint


def _config(**kw):
    return loom.BertConfig(**TINY["bert"], **kw)


def test_mapping_tables_and_get_values():
    import transformers

    names = loom.MODEL_FOR_PRETRAINING_MAPPING_NAMES
    assert names["bert"] == transformers.models.auto.modeling_auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES["bert"]
    assert loom.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["bert"] == "BertLMHeadModel"
    assert loom.MODEL_FOR_PRETRAINING_MAPPING[loom.BertConfig] is loom.BertForPreTraining
    assert loom.BertForPreTraining in get_values(loom.MODEL_FOR_PRETRAINING_MAPPING)
    assert get_values({"a": ("X", "Y"), "b": "Z"}) == ["X", "Y", "Z"]
    with pytest.raises(AttributeError, match="has no attribute 'MODEL_FOR_TELEPATHY_MAPPING'"):
        loom.auto.MODEL_FOR_TELEPATHY_MAPPING


def test_base_model_init_weights_and_from_config():
    head = loom.BertForMaskedLM(_config())
    assert head.base_model is head.bert and head.bert.base_model is head.bert
    with torch.no_grad():
        head.cls.predictions.transform.dense.weight.fill_(7.0)
    head.init_weights()
    assert head.cls.predictions.transform.dense.weight.std() < 0.1  # re-drawn with initializer_range
    assert head.get_output_embeddings().weight is head.bert.embeddings.word_embeddings.weight  # tied again
    config = _config()
    eager = loom.BertModel._from_config(config, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager" and config._attn_implementation != "eager"
    assert loom.BertModel._can_set_attn_implementation()


def test_activation_checkpointing_names_and_config_flag():
    model = loom.BertModel(_config())
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable({"use_reentrant": True})
    assert model.is_activation_checkpointing and model.encoder.layer[0].checkpoint_options == {"use_reentrant": True}
    model.activation_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    config = _config()
    config.gradient_checkpointing = True  # a config of the 4.x era
    assert loom.BertModel(config).is_activation_checkpointing


def test_tp_plan_to_diff_dict_and_vocab_size_after_resize():
    import transformers

    model = loom.BertForMaskedLM(_config())
    assert model.tp_plan == loom.BertForMaskedLM._tp_plan and model.tp_plan is not loom.BertForMaskedLM._tp_plan
    ours = _config(classifier_dropout=0.3).to_diff_dict()
    ref = transformers.BertConfig(**TINY["bert"], classifier_dropout=0.3).to_diff_dict()
    compared = set(ours) & set(ref) - {"transformers_version"}
    assert {"classifier_dropout", "vocab_size", "model_type", "pad_token_id"} <= compared
    assert {k: ours[k] for k in compared} == {k: ref[k] for k in compared}
    assert "use_cache" not in ours and "return_dict" not in ours  # every config's defaults are left out
    model.resize_token_embeddings(120)
    assert model.vocab_size == model.config.vocab_size == 120


def test_loading_info_holds_sets(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "bert", "BertModel")
    with pytest.warns(UserWarning, match="newly initialised"):
        _, info = loom.BertForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.bias", "classifier.weight"}
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set() and info["error_msgs"] == []


def test_output_hidden_states_from_the_config():
    config = _config()
    config.output_hidden_states = True
    out = loom.BertForSequenceClassification(config).eval()(torch.tensor([[5, 6, 7]]))
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (1, 3, 32)


def test_causal_lm_loss_reads_pre_shifted_labels(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "bert", "BertLMHeadModel", is_decoder=True)
    ours = loom.BertLMHeadModel.from_pretrained(path)
    ids = torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(0))
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    with torch.no_grad():
        plain = ours(ids, labels=ids).loss
        torch.testing.assert_close(ours(ids, labels=ids, shift_labels=shifted).loss, plain)
        other = ours(ids, labels=ids, shift_labels=shifted.roll(1, 1)).loss
        torch.testing.assert_close(other, ref(ids, labels=ids, shift_labels=shifted.roll(1, 1)).loss)
    assert not torch.isclose(other, plain)


def test_config_iterates_its_keys_and_resize_refuses_a_fractional_multiple():
    config = _config(classifier_dropout=0.2)
    assert {"vocab_size", "classifier_dropout", "is_decoder"} <= set(config)
    with pytest.raises(ValueError, match=r"pad_to_multiple_of=1.3: pass an integer"):
        loom.BertModel(config).resize_token_embeddings(120, pad_to_multiple_of=1.3)
