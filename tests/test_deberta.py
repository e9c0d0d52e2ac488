"""DeBERTa-v2/v3 against the reference on tiny random checkpoints: every head on a padded batch, the losses, save ->
reference load, the text-classification pipeline, and the settings that change the attention (v3's log buckets and
shared keys in TINY; v2's convolution; separate position projections with absolute positions and a narrow
embedding)."""
from __future__ import annotations

import pytest
import torch

import loom
from loomtest import reference_checkpoint

HEADS = ["DebertaV2Model", "DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification",
         "DebertaV2ForTokenClassification", "DebertaV2ForQuestionAnswering", "DebertaV2ForMultipleChoice"]
VARIANTS = {
    "v3": {},
    # v2-xlarge's layout: a convolution after the first layer, pos_att_type in its older "a|b" spelling
    "v2-conv": dict(conv_kernel_size=3, conv_act="gelu", pos_att_type="p2c|c2p"),
    # own position projections, no buckets (distances clamped at 6), absolute positions and token types, a narrower
    # embedding projected up, c2p only, an untied MLM decoder
    "separate": dict(share_att_key=False, position_buckets=-1, max_relative_positions=6, position_biased_input=True,
                     type_vocab_size=2, embedding_size=16, norm_rel_ebd="none", pos_att_type=["c2p"],
                     tie_word_embeddings=False),
}


def _ids(B=2, T=12, vocab=99, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


def _inputs(cls):
    """A padded batch (row 1 has 8 real tokens); multiple choice gets 3 choices per row."""
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    if cls == "DebertaV2ForMultipleChoice":
        ids = torch.stack([ids, ids.flip(1), (ids + 5) % 99], 1)  # (B, 3, T)
        mask = torch.stack([mask, mask, mask.flip(0)], 1)
        types = types[:, None].expand_as(ids).contiguous()
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def _checkpoint(tmp_path_factory, cls, variant, **overrides):
    # wide weights (std 0.3, not 0.02): the attention scores then move far from uniform, so that a wrong scale or
    # a wrong relative position shows in the outputs
    settings = {"num_labels": 2 if "Question" in cls else 3, "initializer_range": 0.3, **VARIANTS[variant], **overrides}
    return reference_checkpoint(tmp_path_factory, "deberta-v2", cls, **settings)


def _assert_outputs_close(cls, a, b):
    for key in b.keys():
        if key in ("hidden_states", "attentions"):
            continue
        if cls in ("DebertaV2ForSequenceClassification", "DebertaV2ForMultipleChoice"):
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
        else:  # per-token outputs: every position of row 0, the real tokens of row 1 (the padded ones too below)
            torch.testing.assert_close(a[key][0], b[key][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(a[key][1, :8], b[key][1, :8], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cls", HEADS)
def test_heads_match_the_reference_on_a_padded_batch(tmp_path_factory, cls, variant):
    path, ref = _checkpoint(tmp_path_factory, cls, variant)
    ours = getattr(loom, cls).from_pretrained(path)
    inputs = _inputs(cls)
    with torch.no_grad():
        a, b = ours(**inputs), ref(**inputs)
    assert set(a.keys()) == set(b.keys())
    _assert_outputs_close(cls, a, b)
    if cls == "DebertaV2Model":  # padded positions too: the reference lets them attend uniformly, and so does loom
        torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-4, rtol=1e-4)


def test_sequence_longer_than_the_buckets_and_no_mask(tmp_path_factory):
    """40 tokens with 8 buckets reach the far logarithmic buckets; no attention mask at all."""
    path, ref = _checkpoint(tmp_path_factory, "DebertaV2Model", "v3")
    ours = loom.DebertaV2Model.from_pretrained(path)
    ids = _ids(T=40)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, ref(ids).last_hidden_state, atol=1e-4, rtol=1e-4)


def test_scale_counts_the_position_terms_even_without_relative_attention(tmp_path_factory):
    """relative_attention=false with a pos_att_type: no position terms, yet the reference still divides the scores
    by sqrt(head_dim * 3)."""
    path, ref = _checkpoint(tmp_path_factory, "DebertaV2Model", "v3", relative_attention=False)
    ours = loom.DebertaV2Model.from_pretrained(path)
    inputs = _inputs("DebertaV2Model")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).last_hidden_state, ref(**inputs).last_hidden_state, atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("buckets,max_position", [(8, 64), (256, 512), (6, 20)])
def test_log_buckets_equal_the_reference(buckets, max_position):
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    from loom.models.deberta_v2 import log_bucket_positions

    rel = torch.arange(-2 * max_position, 2 * max_position)
    assert torch.equal(log_bucket_positions(rel, buckets, max_position),
                       make_log_bucket_position(rel, buckets, max_position).long())


LABELS = {
    "DebertaV2ForMaskedLM": lambda ids: dict(labels=torch.where(ids % 3 == 0, ids, -100)),
    "DebertaV2ForSequenceClassification": lambda ids: dict(labels=torch.tensor([0, 2])),
    "DebertaV2ForTokenClassification": lambda ids: dict(labels=ids % 3),
    "DebertaV2ForQuestionAnswering": lambda ids: dict(start_positions=torch.tensor([1, 3]),
                                                      end_positions=torch.tensor([4, 40])),
    "DebertaV2ForMultipleChoice": lambda ids: dict(labels=torch.tensor([2, 0])),
}


@pytest.mark.parametrize("cls", list(LABELS))
def test_losses_match_the_reference(tmp_path_factory, cls):
    path, ref = _checkpoint(tmp_path_factory, cls, "v3")
    ours = getattr(loom, cls).from_pretrained(path)
    inputs = _inputs(cls)
    inputs.update(LABELS[cls](inputs["input_ids"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).loss, ref(**inputs).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("labels", [torch.tensor([-1, 2]), torch.tensor([-1, -1]), torch.tensor([[0.2, 0.3, 0.5],
                                                                                               [1.0, 0.0, 0.0]])],
                         ids=["one-skipped", "all-skipped", "soft"])
def test_sequence_classification_loss_quirks(tmp_path_factory, labels):
    """Without a problem_type the reference skips negative labels and reads logits-shaped labels as soft targets."""
    path, ref = _checkpoint(tmp_path_factory, "DebertaV2ForSequenceClassification", "v3")
    ours = loom.DebertaV2ForSequenceClassification.from_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=labels).loss, ref(ids, labels=labels).loss, atol=1e-5, rtol=1e-5)
    assert ours.config.problem_type is None


def test_regression_loss(tmp_path_factory):
    path, ref = _checkpoint(tmp_path_factory, "DebertaV2ForSequenceClassification", "v3", num_labels=1)
    ours = loom.DebertaV2ForSequenceClassification.from_pretrained(path)
    ids, labels = _ids(), torch.tensor([0.5, -1.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=labels).loss, ref(ids, labels=labels).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["v3", "separate"])
@pytest.mark.parametrize("cls", ["DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification",
                                 "DebertaV2ForMultipleChoice"])
def test_save_then_reference_load(tmp_path_factory, tmp_path, cls, variant):
    """loom's files load in the reference with nothing missing or unused and give the same outputs."""
    import transformers

    path, ref = _checkpoint(tmp_path_factory, cls, variant)
    ours = getattr(loom, cls).from_pretrained(path)
    ours.save_pretrained(tmp_path)
    back, info = getattr(transformers, cls).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    inputs = _inputs(cls)
    with torch.no_grad():
        _assert_outputs_close(cls, ours(**inputs), back.eval()(**inputs))


@pytest.mark.parametrize("variant", ["v3", "v2-conv"])
def test_training_gradients_match_the_reference(tmp_path_factory, variant):
    """Without dropout, every parameter's gradient equals the reference's, with labels on padding positions too
    (the reference's padding queries average every value, and pass no gradient to their queries and keys)."""
    path, ref = _checkpoint(tmp_path_factory, "DebertaV2ForMaskedLM", variant, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    ours = loom.DebertaV2ForMaskedLM.from_pretrained(path).train()
    ref.train()
    inputs = _inputs("DebertaV2ForMaskedLM")
    inputs.update(LABELS["DebertaV2ForMaskedLM"](inputs["input_ids"]))
    assert (inputs["labels"][1, 8:] != -100).any()
    ours(**inputs).loss.backward()
    ref(**inputs).loss.backward()
    theirs = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)
    ref.zero_grad()


def test_resize_token_embeddings_keeps_the_tied_bias(tmp_path_factory):
    path, ref = _checkpoint(tmp_path_factory, "DebertaV2ForMaskedLM", "v3")
    ours = loom.DebertaV2ForMaskedLM.from_pretrained(path)
    ours.resize_token_embeddings(120)
    head = ours.cls.predictions
    assert head.decoder.bias is head.bias and head.bias.shape == (120,)
    assert head.decoder.weight is ours.deberta.embeddings.word_embeddings.weight
    ids = _ids()
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(logits[..., :99], ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert logits.shape[-1] == 120


def test_non_legacy_mlm_head(tmp_path_factory):
    """legacy=false: the original DeBERTa head, whose logits read the word embeddings."""
    path, ref = _checkpoint(tmp_path_factory, "DebertaV2ForMaskedLM", "v3", legacy=False)
    ours = loom.DebertaV2ForMaskedLM.from_pretrained(path)
    inputs = _inputs("DebertaV2ForMaskedLM")
    with torch.no_grad():
        _assert_outputs_close("DebertaV2ForMaskedLM", ours(**inputs), ref(**inputs))


def test_eager_attentions_match(tmp_path_factory):
    path, ref = _checkpoint(tmp_path_factory, "DebertaV2Model", "v2-conv")
    ours = loom.DebertaV2Model.from_pretrained(path, attn_implementation="eager")
    inputs = _inputs("DebertaV2Model")
    with torch.no_grad():
        a = ours(**inputs, output_attentions=True, output_hidden_states=True)
        b = ref(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(a.attentions) == len(b.attentions) == 2 and len(a.hidden_states) == len(b.hidden_states) == 3
    for x, y in zip(a.attentions + a.hidden_states, b.attentions + b.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_auto_classes_pick_deberta(tmp_path_factory):
    path, _ = _checkpoint(tmp_path_factory, "DebertaV2ForMultipleChoice", "v3")
    assert type(loom.AutoModelForMultipleChoice.from_pretrained(path)) is loom.DebertaV2ForMultipleChoice
    assert type(loom.AutoModel.from_pretrained(path)) is loom.DebertaV2Model
    assert loom.AutoConfig.from_pretrained(path).model_type == "deberta-v2"


def test_text_classification_pipeline_matches_the_reference(tmp_path_factory, minilm_dir):
    import shutil

    import transformers

    transformers.logging.set_verbosity_error()
    path, _ = reference_checkpoint(tmp_path_factory, "deberta-v2", "DebertaV2ForSequenceClassification",
                                   vocab_size=30522, initializer_range=0.5,
                                   id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir / name).exists():
            shutil.copy(minilm_dir / name, path / name)
    texts = ["a fine film", "the worst plot I have seen in years, and far too long", "ok"]
    ours = loom.pipeline("text-classification", model=str(path))(texts, top_k=None)
    ref = transformers.pipeline("text-classification", model=str(path), device="cpu")(texts, top_k=None)
    for a, b in zip(ours, ref):
        assert [x["label"] for x in a] == [x["label"] for x in b]
        torch.testing.assert_close(torch.tensor([x["score"] for x in a]), torch.tensor([x["score"] for x in b]),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key,value,message", [
    ("hidden_act", "mish", "hidden_act='mish' is not supported"),
    ("conv_act", "swishy", "conv_act='swishy' is not supported"),
    ("pooler_hidden_act", "nope", "pooler_hidden_act='nope' is not supported"),
    ("share_att_key", "yes", "share_att_key must be a bool"),
])
def test_bad_config_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        loom.DebertaV2Config(**{key: value})


def test_bad_mask_shape_is_refused():
    model = loom.DebertaV2Model(loom.DebertaV2Config(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=4, intermediate_size=37))
    ids = _ids()
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, sequence\)"):
        model(ids, attention_mask=torch.ones(2, 1, 12, 12))


# -- tokenizer: DeBERTa-v3's sentencepiece `spm.model` ---------------------------------------------------------------
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld, ça va? Ünïcödé text here!",
          "Tokenizers split words into pieces; numbers like 12345 too.", "日本語のテキストも少し。",
          "Привет мир, как дела?", "Ελληνικά και العربية معًا", "DeBERTa-v3 reads SentencePiece pieces.",
          "Relative positions, disentangled attention and a masked language model."]
TEXTS = ["The quick brown fox", "Héllo  wörld [MASK] 12345", "日本語 Привет", "  lead and trail  ",
         "tab\tand\nnewline", "", "Ελληνικά العربية", "UPPER lower MiXeD", "ﬁ ligature and full-width ＡＢＣ"]


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory):
    """A tiny unigram spm.model laid out as DeBERTa-v3's hub folders are (spm.model, a two-key tokenizer_config.json,
    the model's config.json; [MASK] is not a piece and is appended after them), and the same tokenizer saved by the
    reference's DebertaV2Tokenizer (tokenizer.json)."""
    import json
    import shutil

    spm = pytest.importorskip("sentencepiece")
    import transformers

    root = tmp_path_factory.mktemp("deberta-spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 30), model_prefix=str(root / "spm"),
                                   vocab_size=120, model_type="unigram", character_coverage=1.0, pad_id=0, bos_id=1,
                                   eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
                                   unk_piece="[UNK]", minloglevel=2)
    dirs = {}
    for name, settings in (("hub", {}), ("hub-lower", {"do_lower_case": True})):
        path = root / name
        path.mkdir()
        shutil.copy(root / "spm.model", path / "spm.model")
        (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm",
                                                                **settings}))
        (path / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
        dirs[name] = path
    dirs["saved"] = root / "saved"
    transformers.DebertaV2Tokenizer.from_pretrained(dirs["hub"]).save_pretrained(dirs["saved"])
    return dirs


@pytest.mark.parametrize("layout", ["hub", "hub-lower", "saved"])
def test_tokenizer_ids_match_the_reference(spm_dirs, layout):
    import transformers

    ours = loom.AutoTokenizer.from_pretrained(spm_dirs[layout])
    ref = transformers.AutoTokenizer.from_pretrained(spm_dirs[layout])
    assert type(ref).__name__ == "DebertaV2Tokenizer"
    for text in TEXTS:
        assert dict(ours(text)) == dict(ref(text)), text
    a = ours(TEXTS[:4], TEXTS[4:8], padding=True, truncation=True, max_length=16)
    b = ref(TEXTS[:4], TEXTS[4:8], padding=True, truncation=True, max_length=16)
    assert dict(a) == dict(b)
    assert ours.convert_tokens_to_ids("[MASK]") == ref.mask_token_id == len(ref) - 1
    ids = ref(TEXTS[1], TEXTS[2])["input_ids"]
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_tokenizer_saved_by_loom_loads_in_the_reference(spm_dirs, tmp_path):
    import transformers

    loom.AutoTokenizer.from_pretrained(spm_dirs["hub"]).save_pretrained(tmp_path)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(spm_dirs["hub"])
    for text in TEXTS:
        assert back(text)["input_ids"] == ref(text)["input_ids"], text


def test_reranker_pairs_through_text_classification_with_the_spm_tokenizer(spm_dirs, tmp_path_factory):
    """A DeBERTa-v3 cross-encoder as users run one: the hub tokenizer layout beside the model, sentence pairs through
    `text-classification`; scores equal to the reference pipeline's."""
    import shutil

    import transformers

    transformers.logging.set_verbosity_error()
    path, _ = _checkpoint(tmp_path_factory, "DebertaV2ForSequenceClassification", "v3", vocab_size=121, num_labels=1,
                          type_vocab_size=2)
    for name in ("spm.model", "tokenizer_config.json"):
        shutil.copy(spm_dirs["hub"] / name, path / name)
    pairs = [{"text": "the quick brown fox", "text_pair": "a lazy dog"},
             {"text": "Привет мир", "text_pair": "Héllo wörld, ça va?"}]
    ours = loom.pipeline("text-classification", model=str(path))(pairs, function_to_apply="none")
    ref = transformers.pipeline("text-classification", model=str(path), device="cpu")(pairs, function_to_apply="none")
    assert [x["label"] for x in ours] == [x["label"] for x in ref]
    torch.testing.assert_close(torch.tensor([x["score"] for x in ours]), torch.tensor([x["score"] for x in ref]),
                               atol=1e-5, rtol=1e-4)
