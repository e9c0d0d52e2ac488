"""ModernBERT against the reference on tiny random checkpoints: every head on a padded batch longer than the local
window (sdpa and eager), losses, hidden states and attentions, legacy and 5.x configs, save -> reference load,
pipelines and a tokenizer.json with ModernBERT's special tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import loom
from loomtest import TINY, reference_checkpoint

HEADS = ["ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification",
         "ModernBertForTokenClassification", "ModernBertForQuestionAnswering", "ModernBertForMultipleChoice"]
T = 20  # longer than the 8-token local window (+-4) of the tiny config, so local layers differ from global ones


def _labels(cls: str) -> int:
    return 2 if "Question" in cls else 3


def _batch(multiple_choice: bool, left_padding: bool = False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding on row 1
    if left_padding:
        mask[0, :5] = 0
    if multiple_choice:  # (batch 2, choices 2, T): each choice its own padding
        ids = torch.stack([ids, ids.flip(0)], 1)
        mask = torch.stack([mask, mask.flip(0)], 1)
    return ids, mask


def _load(tmp_path_factory, cls, attn="sdpa", **overrides):
    path, ref = reference_checkpoint(tmp_path_factory, "modernbert", cls, num_labels=_labels(cls),
                                     attn_implementation=attn, **overrides)
    return path, ref, getattr(loom, cls).from_pretrained(path, attn_implementation=attn)


def _assert_same_outputs(a, b, mask):
    """Every output of the reference within 1e-4; per-token outputs are compared on the real tokens."""
    real = mask.reshape(-1, mask.shape[-1]).bool()
    for key in b.keys():
        if key in ("hidden_states", "attentions"):
            continue
        x, y = a[key], b[key]
        assert x.shape == y.shape, key
        if x.dim() >= 2 and x.shape[:2] == real.shape:
            x, y = x[real], y[real]
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cls", HEADS)
def test_heads_match_reference_on_padded_batch(tmp_path_factory, cls, attn):
    _, ref, ours = _load(tmp_path_factory, cls, attn)
    ids, mask = _batch("Multiple" in cls)
    with torch.no_grad():
        _assert_same_outputs(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask), mask)
        _assert_same_outputs(ours(ids), ref(ids), torch.ones_like(ids))


@pytest.mark.parametrize("cls", ["ModernBertForSequenceClassification", "ModernBertForMultipleChoice"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_pooling_with_left_padding(tmp_path_factory, cls, pooling):
    """"mean" averages the real tokens; "cls" reads position 0 (sequence classification) or each choice's first real
    token (multiple choice), as the reference does."""
    _, ref, ours = _load(tmp_path_factory, cls, classifier_pooling=pooling)
    ids, mask = _batch("Multiple" in cls, left_padding=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=1e-4)


def test_local_window_binds(tmp_path_factory):
    """The test inputs reach past the window: widening it changes the output, so the parity above covers it."""
    path, ref, ours = _load(tmp_path_factory, "ModernBertModel")
    ids, mask = _batch(False)
    wide = loom.ModernBertModel.from_pretrained(path, local_attention=4 * T)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).last_hidden_state, wide(ids, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("cls,kwargs", [
    ("ModernBertForMaskedLM", lambda ids: dict(labels=torch.where(ids % 3 == 0, ids, -100))),
    ("ModernBertForSequenceClassification", lambda ids: dict(labels=torch.tensor([0, 2]))),
    ("ModernBertForTokenClassification", lambda ids: dict(labels=ids % 3)),
    ("ModernBertForQuestionAnswering", lambda ids: dict(start_positions=torch.tensor([1, 3]),
                                                       end_positions=torch.tensor([4, 40]))),
    ("ModernBertForMultipleChoice", lambda ids: dict(labels=torch.tensor([1, 0]))),
])
def test_losses_match_reference(tmp_path_factory, cls, kwargs):
    _, ref, ours = _load(tmp_path_factory, cls)
    ids, mask = _batch("Multiple" in cls)
    args = kwargs(ids)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask, **args), ref(ids, attention_mask=mask, **args)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


def test_sparse_prediction_matches_reference(tmp_path_factory):
    """sparse_prediction: with labels, logits only for the labelled tokens (flattened), the same loss."""
    _, ref, ours = _load(tmp_path_factory, "ModernBertForMaskedLM", sparse_prediction=True)
    ids, mask = _batch(False)
    labels = torch.where(ids % 3 == 0, ids, -100)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == b.logits.shape == (int((labels != -100).sum()), 99)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


def test_hidden_states_and_attentions_match_reference(tmp_path_factory):
    _, ref, ours = _load(tmp_path_factory, "ModernBertModel", "eager")
    ids, mask = _batch(False)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        b = ref(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 4 and len(a.attentions) == len(b.attentions) == 3
    for x, y in zip(a.hidden_states + a.attentions, b.hidden_states + b.attentions):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_legacy_config_keys(tmp_path_factory):
    """A 4.x config.json (global_attn_every_n_layers, global_rope_theta, local_rope_theta; no layer_types or
    rope_parameters) gives the layer types and RoPE bases the reference derives from it."""
    import transformers

    path, _, _ = _load(tmp_path_factory, "ModernBertForMaskedLM")
    config = json.loads((path / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        config.pop(key)
    # the other keys of answerdotai/ModernBERT-base's config.json that 5.x no longer knows
    config.update(global_attn_every_n_layers=3, global_rope_theta=500.0, local_rope_theta=50.0,
                  reference_compile=None, repad_logits_with_grad=False, gradient_checkpointing=False,
                  position_embedding_type="absolute", layer_norm_eps=1e-05, transformers_version="4.48.0.dev0")
    (path / "config.json").write_text(json.dumps(config))
    ours = loom.ModernBertForMaskedLM.from_pretrained(path)
    ref = transformers.ModernBertForMaskedLM.from_pretrained(path).eval()
    assert ours.config.layer_types == ref.config.layer_types == ["full_attention", "sliding_attention",
                                                                 "sliding_attention"]
    assert ours.config.rope_parameters["sliding_attention"]["rope_theta"] == 50.0
    ids, mask = _batch(False)
    with torch.no_grad():
        _assert_same_outputs(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask), mask)
    out = tmp_path_factory.mktemp("loom-legacy")  # loom writes the 5.x form, which the reference reads back
    ours.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert "global_rope_theta" not in saved and saved["rope_parameters"]["full_attention"]["rope_theta"] == 500.0
    again = transformers.ModernBertForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        _assert_same_outputs(ours(ids, attention_mask=mask), again(ids, attention_mask=mask), mask)


@pytest.mark.parametrize("cls", HEADS)
def test_save_then_reference_load(tmp_path_factory, cls):
    import transformers

    _, _, ours = _load(tmp_path_factory, cls)
    out = tmp_path_factory.mktemp(f"loom-{cls}")
    ours.save_pretrained(out)
    ref = getattr(transformers, cls).from_pretrained(out).eval()
    if cls == "ModernBertForMaskedLM":
        assert ref.decoder.weight.data_ptr() == ref.model.embeddings.tok_embeddings.weight.data_ptr()
    ids, mask = _batch("Multiple" in cls)
    with torch.no_grad():
        _assert_same_outputs(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask), mask)


def test_auto_classes_pick_modernbert(tmp_path_factory):
    path, _, _ = _load(tmp_path_factory, "ModernBertForMultipleChoice")
    assert type(loom.AutoModelForMultipleChoice.from_pretrained(path)) is loom.ModernBertForMultipleChoice
    assert type(loom.AutoModel.from_pretrained(path)) is loom.ModernBertModel


@pytest.mark.parametrize("changes,message", [
    (dict(classifier_pooling="max"), "classifier_pooling='max' is not supported; use 'cls' or 'mean'"),
    (dict(layer_types=["full_attention"]), "layer_types=.* must list one of"),
    (dict(layer_types=None, global_attn_every_n_layers=0), "global_attn_every_n_layers=0 must be at least 1"),
    (dict(hidden_activation="nope"), "hidden_activation='nope' is not supported by loom"),
    (dict(rope_parameters={"full_attention": {"rope_type": "magic", "rope_theta": 1.0}}),
     "rope_type'\\]='magic' is not supported"),
])
def test_bad_config_is_refused_by_name(tmp_path_factory, changes, message):
    path, _, _ = _load(tmp_path_factory, "ModernBertModel")
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ValueError, match=message):
        loom.ModernBertModel.from_pretrained(path)


# -- tokenizer and pipelines ------------------------------------------------------------------------------------------
CORPUS = ["The capital of France is Paris.", "A cat sat on the mat, and the dog sat on the log.",
          "ModernBERT reads long documents quickly.", "Fünf Äpfel kosten 3,50 € — naïve café prices!",
          "def tokenize(text): return text.split()", "    indented   spaces\tand\ttabs\nnew lines"]
SPECIALS = {"[UNK]": False, "[CLS]": False, "[SEP]": False, "[PAD]": False, "[MASK]": True}  # token -> lstrip


@pytest.fixture(scope="module")
def modernbert_tokenizer_dir(tmp_path_factory):
    """ModernBERT's tokenizer layout at toy size, saved by the reference: a byte-level BPE trained on CORPUS, its
    special tokens appended after the merges (as in ModernBERT, where they follow the OLMo vocabulary), [MASK] with
    lstrip, and "[CLS] $A [SEP]" / "[CLS] $A [SEP] $B [SEP]" templates."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, lstrip=lstrip, normalized=False) for t, lstrip in SPECIALS.items()])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=True)
    path = tmp_path_factory.mktemp("modernbert-tokenizer")
    fast.save_pretrained(path)
    return path


def test_tokenizer_json_ids_match_reference(modernbert_tokenizer_dir):
    import transformers

    ours = loom.AutoTokenizer.from_pretrained(modernbert_tokenizer_dir)
    ref = transformers.AutoTokenizer.from_pretrained(modernbert_tokenizer_dir)
    texts = CORPUS + ["unseen wörds [MASK] and [MASK]tokens", "Paris is the [MASK] of France.", ""]
    assert ours.mask_token_id == ref.mask_token_id and ours.pad_token_id == ref.pad_token_id
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == ref.decode(ref(text)["input_ids"]), text
    a = ours(texts[:3], texts[3:6], padding=True, return_tensors="pt")
    b = ref(texts[:3], texts[3:6], padding=True, return_tensors="pt")
    assert sorted(a.keys()) == sorted(b.keys()) == ["attention_mask", "input_ids"]
    for key in b:
        assert torch.equal(a[key], b[key]), key


def _pipeline_checkpoint(tmp_path_factory, tokenizer_dir, cls, **overrides):
    import shutil

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    # wide init and a window of +-2 tokens: decisive scores, and the sentences below reach past the window
    path, _ = reference_checkpoint(tmp_path_factory, "modernbert", cls, vocab_size=len(tokenizer),
                                   pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                                   sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                                   eos_token_id=tokenizer.sep_token_id, initializer_range=0.5, local_attention=4,
                                   **overrides)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, path / file.name)
    return path


def _same(ours, theirs):
    """Equal structure and values; floats within 1e-4."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs)
        for key in theirs:
            _same(ours[key], theirs[key])
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _same(a, b)
    elif isinstance(theirs, (float, np.floating)):
        assert abs(float(ours) - float(theirs)) <= 1e-4, (ours, theirs)
    else:
        assert ours == theirs


def test_fill_mask_pipeline_matches_reference(tmp_path_factory, modernbert_tokenizer_dir):
    import transformers

    path = _pipeline_checkpoint(tmp_path_factory, modernbert_tokenizer_dir, "ModernBertForMaskedLM")
    ours = loom.pipeline("fill-mask", model=str(path))
    ref = transformers.pipeline("fill-mask", model=str(path), device="cpu")
    texts = ["The capital of France is [MASK].", "A cat sat on the [MASK], and the dog sat on the log.",
             "[MASK] reads"]
    _same(ours(texts[0]), ref(texts[0]))
    _same(ours(texts, batch_size=3), ref(texts, batch_size=3))
    _same(ours(texts[1], top_k=2), ref(texts[1], top_k=2))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_classification_pipeline_matches_reference(tmp_path_factory, modernbert_tokenizer_dir, pooling):
    import transformers

    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    path = _pipeline_checkpoint(tmp_path_factory, modernbert_tokenizer_dir, "ModernBertForSequenceClassification",
                                classifier_pooling=pooling, id2label=labels,
                                label2id={v: k for k, v in labels.items()})
    ours = loom.pipeline("text-classification", model=str(path))
    ref = transformers.pipeline("text-classification", model=str(path), device="cpu")
    _same(ours(CORPUS[1]), ref(CORPUS[1]))
    _same(ours(CORPUS, batch_size=4), ref(CORPUS, batch_size=4))
    _same(ours(CORPUS[:2], top_k=None), ref(CORPUS[:2], top_k=None))
    pair = {"text": CORPUS[0], "text_pair": CORPUS[2]}  # a reranker's (query, passage) input: [CLS] a [SEP] b [SEP]
    _same(ours(pair), ref(pair))


def test_new_weights_are_drawn_as_the_reference_draws_them(tmp_path_factory):
    """Fresh weights (a new model, or a head missing from a base checkpoint) come from the reference's truncated
    normals: initializer_range for inputs, divided by sqrt(2 * layers) for outputs, hidden_size**-0.5 for the
    classifier, all cut at initializer_cutoff_factor standard deviations."""
    import transformers

    sizes = dict(hidden_size=256, intermediate_size=384, num_labels=64, initializer_range=0.05)
    path, ref = reference_checkpoint(tmp_path_factory, "modernbert", "ModernBertModel", **sizes)
    ours = loom.ModernBertForSequenceClassification.from_pretrained(path, num_labels=64)
    ref = transformers.ModernBertForSequenceClassification(ref.config).eval()
    fresh = loom.ModernBertForSequenceClassification(ours.config)
    for name in ("classifier.weight", "head.dense.weight", "model.layers.1.attn.Wqkv.weight",
                 "model.layers.1.attn.Wo.weight", "model.layers.2.mlp.Wo.weight",
                 "model.embeddings.tok_embeddings.weight"):
        theirs = ref.get_parameter(name)
        for model in ([ours, fresh] if name.startswith(("classifier", "head")) else [fresh]):
            w = model.get_parameter(name)
            assert abs(w.std() / theirs.std() - 1) < 0.05, name
            assert w.abs().max() <= 2.0 * theirs.std() * 1.2, name  # initializer_cutoff_factor 2


def test_inputs_embeds_match_reference(tmp_path_factory):
    """inputs_embeds skip the token lookup but still pass the embedding norm, as in the reference."""
    _, ref, ours = _load(tmp_path_factory, "ModernBertForMaskedLM")
    ids, mask = _batch(False)
    embeds = ref.model.embeddings.tok_embeddings(ids).detach() * 1.5
    with torch.no_grad():
        _assert_same_outputs(ours(inputs_embeds=embeds, attention_mask=mask),
                             ref(inputs_embeds=embeds, attention_mask=mask), mask)


@pytest.mark.parametrize("task,cls", [("token-classification", "ModernBertForTokenClassification"),
                                      ("feature-extraction", "ModernBertModel")])
def test_other_pipelines_match_reference(tmp_path_factory, modernbert_tokenizer_dir, task, cls):
    """(The reference 5.x has no question-answering pipeline left to compare with.)"""
    import transformers

    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    path = _pipeline_checkpoint(tmp_path_factory, modernbert_tokenizer_dir, cls, id2label=labels,
                                label2id={v: k for k, v in labels.items()})
    ours = loom.pipeline(task, model=str(path))
    ref = transformers.pipeline(task, model=str(path), device="cpu")
    _same(ours(CORPUS[:3]), ref(CORPUS[:3]))
    if task != "feature-extraction":  # batched, the reference returns each text's vectors padded to the batch
        _same(ours(CORPUS[:3], batch_size=3), ref(CORPUS[:3], batch_size=3))


@pytest.mark.parametrize("overrides", [
    dict(attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True, decoder_bias=False),
    dict(local_attention=7, global_attn_every_n_layers=1),  # odd window (+-3); every layer global
    dict(layer_types=["sliding_attention", "sliding_attention", "full_attention"], local_attention=4),
    dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 30.0}}),
    dict(hidden_activation="gelu_pytorch_tanh", classifier_activation="silu", norm_eps=1e-3),
], ids=["biases", "odd-window-all-global", "explicit-layer-types", "nested-rope-parameters", "activations"])
def test_config_variants_match_reference(tmp_path_factory, overrides):
    _, ref, ours = _load(tmp_path_factory, "ModernBertForMaskedLM", **overrides)
    assert ours.config.layer_types == ref.config.layer_types
    ids, mask = _batch(False)
    with torch.no_grad():
        _assert_same_outputs(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask), mask)


def test_bf16_close_to_reference(tmp_path_factory):
    """bf16 weights and activations (RoPE applied in float32 as the reference does): logits within bf16 rounding."""
    import transformers

    path, _, _ = _load(tmp_path_factory, "ModernBertForMaskedLM")
    ours = loom.ModernBertForMaskedLM.from_pretrained(path, dtype=torch.bfloat16)
    ref = transformers.ModernBertForMaskedLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, mask = _batch(False)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert a.dtype == b.dtype == torch.bfloat16
    real = mask.bool()
    torch.testing.assert_close(a[real].float(), b[real].float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_reference(tmp_path_factory, checkpointing):
    """A training step's gradients (train mode, dropout 0) equal the reference's, with gradient checkpointing too."""
    _, ref, ours = _load(tmp_path_factory, "ModernBertForSequenceClassification", classifier_pooling="mean")
    ours.train(), ref.train()
    if checkpointing:
        ours.gradient_checkpointing_enable()
        assert ours.model.gradient_checkpointing
    ids, mask = _batch(False)
    labels = torch.tensor([0, 2])
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name).grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
