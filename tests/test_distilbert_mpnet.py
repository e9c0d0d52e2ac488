"""DistilBERT and MPNet against the reference: every head's outputs on a padded batch, losses, checkpoints both ways."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.auto import model_table
from loomtest import reference_checkpoint as _fresh_reference

FAMILIES = ("distilbert", "mpnet")
HEADS = [(t, cls.__name__) for t in FAMILIES for cls in model_table()[t][1].values()]
# per-sequence outputs: compared over the whole batch; the others per real token
POOLED = ("pooler_output",)


def reference_checkpoint(tmp_path_factory, model_type, cls, **overrides):
    """A reference checkpoint whose every parameter is random (fresh ones have zero biases and unit norms, which
    would hide a bias or norm loom reads from the wrong key); saved again by the reference."""
    path, ref = _fresh_reference(tmp_path_factory, model_type, cls, **overrides)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") or "layer_norm.weight" in name else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(path)
    return path, ref


def _ids(B=2, T=12, seed=1):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


def _padded(model_type, B=2, T=12):
    """A batch whose second row is right-padded after 8 tokens with the family's pad id."""
    ids = _ids(B, T)
    pad = 1 if model_type == "mpnet" else 0
    ids[ids == pad] = 5
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = pad
    return ids, mask


def _num_labels(cls):
    return 2 if "Question" in cls else 3


def _inputs(cls, ids, mask):
    if "MultipleChoice" in cls:  # (batch 1, 2 choices, T)
        return dict(input_ids=ids[None], attention_mask=mask[None])
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("model_type,cls", HEADS)
def test_heads_match_reference_on_padded_batch(tmp_path_factory, model_type, cls):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, num_labels=_num_labels(cls))
    ours = getattr(loom, cls).from_pretrained(path)
    ids, mask = _padded(model_type)
    kw = _inputs(cls, ids, mask)
    with torch.no_grad():
        a, b = ours(**kw), ref(**kw)
    for key in b.keys():
        if key in ("hidden_states", "attentions"):
            continue
        if key in POOLED or a[key].dim() == 2 and key == "logits" and "Token" not in cls and "Masked" not in cls:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
        else:  # per-token outputs: the real tokens (padding positions differ by design, as in the reference's SDPA)
            torch.testing.assert_close(a[key][0], b[key][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(a[key][1, :8], b[key][1, :8], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_losses_match_reference(tmp_path_factory, model_type):
    ids, mask = _padded(model_type)
    heads = model_table()[model_type][1]
    cases = {"masked-lm": dict(labels=torch.where(ids % 3 == 0, ids, -100)),
             "sequence-classification": dict(labels=torch.tensor([0, 2])),
             "token-classification": dict(labels=ids % 3),
             "question-answering": dict(start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([4, 40])),
             "multiple-choice": dict(labels=torch.tensor([1]))}
    for head, labels in cases.items():
        cls = heads[head].__name__
        path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, num_labels=_num_labels(cls))
        ours = getattr(loom, cls).from_pretrained(path)
        kw = {**_inputs(cls, ids, mask), **labels}
        with torch.no_grad():
            torch.testing.assert_close(ours(**kw).loss, ref(**kw).loss, atol=1e-5, rtol=1e-5, msg=cls)


@pytest.mark.parametrize("model_type,cls", HEADS)
def test_loom_checkpoint_loads_in_reference(tmp_path_factory, tmp_path, model_type, cls):
    import transformers

    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls, num_labels=_num_labels(cls))
    ours = getattr(loom, cls).from_pretrained(path)
    ours.save_pretrained(tmp_path)
    back, info = getattr(transformers, cls).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = _padded(model_type)
    kw = _inputs(cls, ids, mask)
    with torch.no_grad():
        a, b = ours(**kw), back.eval()(**kw)
    key = next(k for k in ("logits", "start_logits", "last_hidden_state") if k in b)
    torch.testing.assert_close(a[key][0], b[key][0], atol=1e-4, rtol=1e-4)


def test_distilbert_sinusoidal_positions_match_reference(tmp_path_factory):
    # the reference's own initialisation (not perturbed): its position table is the sinusoids
    path, ref = _fresh_reference(tmp_path_factory, "distilbert", "DistilBertModel", sinusoidal_pos_embds=True)
    ours = loom.DistilBertModel.from_pretrained(path)
    fresh = loom.DistilBertModel(loom.AutoConfig.from_pretrained(path))  # initialised here, not loaded
    table = ref.embeddings.position_embeddings.weight
    torch.testing.assert_close(fresh.embeddings.position_embeddings.weight, table, atol=1e-6, rtol=1e-6)
    ids, mask = _padded("distilbert")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).last_hidden_state[0], ref(ids, mask).last_hidden_state[0],
                                   atol=1e-4, rtol=1e-4)


def test_mpnet_long_sequence_crosses_the_log_spaced_buckets(tmp_path_factory):
    # 60 tokens: offsets up to 59 use the log-spaced buckets (exact below 8), and positions reach 61 of 64
    path, ref = reference_checkpoint(tmp_path_factory, "mpnet", "MPNetModel")
    ours = loom.MPNetModel.from_pretrained(path)
    ids = _ids(1, 62)
    ids[ids == 1] = 5
    with torch.no_grad():
        a, b = ours(ids), ref(ids)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        ours(_ids(1, 63))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_eager_attentions_and_hidden_states_match_reference(tmp_path_factory, model_type):
    import transformers

    cls = model_table()[model_type][1]["base"].__name__
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls)
    ours = getattr(loom, cls).from_pretrained(path, attn_implementation="eager")
    ref = getattr(transformers, cls).from_pretrained(path, attn_implementation="eager").eval()
    ids, mask = _padded(model_type)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        b = ref(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(a.attentions) == len(b.attentions) and len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x[0], y[0], atol=1e-5, rtol=1e-5)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x[0], y[0], atol=1e-4, rtol=1e-4)


def test_auto_classes_pick_the_families(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "mpnet", "MPNetForMultipleChoice")
    assert type(loom.AutoModelForMultipleChoice.from_pretrained(path)).__name__ == "MPNetForMultipleChoice"
    path, _ = reference_checkpoint(tmp_path_factory, "distilbert", "DistilBertForMaskedLM")
    model = loom.AutoModelForMaskedLM.from_pretrained(path)
    assert model.vocab_projector.weight is model.distilbert.embeddings.word_embeddings.weight


def test_distilbert_bad_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="activation"):
        loom.DistilBertConfig(activation="bogus")
    with pytest.raises(ValueError, match="num_labels=2"):
        loom.DistilBertForQuestionAnswering(loom.DistilBertConfig(num_labels=3, dim=32, n_heads=4, n_layers=1,
                                                                  hidden_dim=16, vocab_size=10))



# -- tokenizers and pipelines -------------------------------------------------------------------------------------
CORPUS = ["Hello world, héllo!", "the <mask> sat on the [MASK]", "Ünïcödé naïve café — 中文 テスト", "  spaced   out\ttabs ",
          "Привет, мир. Γειά σου κόσμε", "don't stop-believing 3.14 $5"]
PAIRS = (["a question?", "short"], ["its answer here.", "a longer second segment than the first"])


def _write_tokenizer(model_type, folder, minilm_dir, legacy: bool):
    """The reference's own tokenizer class for the family over MiniLM's WordPiece vocabulary (MPNet's adds <s>, <pad>,
    </s>, <unk> in front and <mask> at the end: 30527 tokens, as the real one), saved as tokenizer.json, or as the
    legacy vocab.txt + tokenizer_config.json when `legacy`."""
    import json

    import transformers

    lines = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if model_type == "mpnet":
        lines = ["<s>", "<pad>", "</s>", "<unk>", *lines, "<mask>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cls = transformers.MPNetTokenizer if model_type == "mpnet" else transformers.DistilBertTokenizer
    tok = cls(vocab=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    if legacy:
        (folder / "tokenizer.json").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("backend", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("legacy", [False, True], ids=["tokenizer.json", "vocab.txt"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_tokenizer_ids_match_reference(tmp_path, minilm_dir, model_type, legacy):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(_write_tokenizer(model_type, tmp_path / "ref", minilm_dir, False))
    ours = loom.AutoTokenizer.from_pretrained(_write_tokenizer(model_type, tmp_path / "ours", minilm_dir, legacy))
    for kw in (dict(padding=True), dict(padding="max_length", truncation=True, max_length=9)):
        assert dict(ours(CORPUS, **kw)) == dict(ref(CORPUS, **kw)), kw
        assert dict(ours(*PAIRS, **kw)) == dict(ref(*PAIRS, **kw)), kw
    ids = ref(CORPUS)["input_ids"]
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert (ours.pad_token_id, ours.mask_token_id) == (ref.pad_token_id, ref.mask_token_id)


# the reference (5.x) has no question-answering pipeline to compare with
PIPELINE_HEADS = {"feature-extraction": "base", "fill-mask": "masked-lm",
                  "text-classification": "sequence-classification", "token-classification": "token-classification"}


@pytest.mark.parametrize("task", sorted(PIPELINE_HEADS))
@pytest.mark.parametrize("model_type", FAMILIES)
def test_pipelines_match_reference(tmp_path_factory, minilm_dir, model_type, task):
    import transformers

    cls = model_table()[model_type][1][PIPELINE_HEADS[task]].__name__
    vocab = 30527 if model_type == "mpnet" else 30522
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls, vocab_size=vocab, max_position_embeddings=128,
                                   initializer_range=0.5, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                   label2id={"NEGATIVE": 0, "POSITIVE": 1})
    _write_tokenizer(model_type, path, minilm_dir, False)
    mask = "<mask>" if model_type == "mpnet" else "[MASK]"
    texts = [f"the weather {mask} today", f"a much longer sentence {mask} about the weather"]
    ours = loom.pipeline(task, model=str(path))(texts)
    ref = transformers.pipeline(task, model=str(path))(texts)
    if task == "token-classification":
        assert [[(r["word"], r["entity"], r["start"]) for r in a] for a in ours] == \
            [[(r["word"], r["entity"], r["start"]) for r in b] for b in ref]
        torch.testing.assert_close(torch.tensor([r["score"] for a in ours for r in a]),
                                   torch.tensor([r["score"] for b in ref for r in b]), atol=1e-4, rtol=1e-4)
    elif task == "feature-extraction":
        for a, b in zip(ours, ref):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)
    elif task == "fill-mask":
        for a, b in zip(ours, ref):
            assert [r["token"] for r in a] == [r["token"] for r in b]
            assert [r["sequence"] for r in a] == [r["sequence"] for r in b]
            torch.testing.assert_close(torch.tensor([r["score"] for r in a]), torch.tensor([r["score"] for r in b]),
                                       atol=1e-4, rtol=1e-4)
    else:
        assert [r["label"] for r in ours] == [r["label"] for r in ref]
        torch.testing.assert_close(torch.tensor([r["score"] for r in ours]), torch.tensor([r["score"] for r in ref]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_inputs_embeds_and_default_configs_match_reference(tmp_path_factory, tmp_path, model_type):
    import transformers

    cls = model_table()[model_type][1]["base"].__name__
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls)
    ours = getattr(loom, cls).from_pretrained(path)
    embeds = ref.get_input_embeddings()(_ids()).detach()
    with torch.no_grad():  # no ids: MPNet counts positions from padding_idx + 1 without looking for padding
        torch.testing.assert_close(ours(inputs_embeds=embeds).last_hidden_state,
                                   ref(inputs_embeds=embeds).last_hidden_state, atol=1e-4, rtol=1e-4)
    transformers.AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    default = loom.AutoConfig.from_pretrained(tmp_path)
    assert (default.hidden_size, default.num_hidden_layers, default.num_attention_heads) == (768, 6 if model_type ==
                                                                                             "distilbert" else 12, 12)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_training_step_with_dropout_and_checkpointing(tmp_path_factory, model_type):
    cls = model_table()[model_type][1]["masked-lm"].__name__
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls)
    ours = getattr(loom, cls).from_pretrained(path)
    ours.train()
    ours.gradient_checkpointing_enable()
    ids, mask = _padded(model_type)
    loss = ours(ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100)).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ours.eval()
    with torch.no_grad():  # dropout off again: two passes agree
        assert torch.equal(ours(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_bf16_close_to_reference(tmp_path_factory, model_type):
    import transformers

    cls = model_table()[model_type][1]["masked-lm"].__name__
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls)
    ours = getattr(loom, cls).from_pretrained(path, dtype=torch.bfloat16)
    ref = getattr(transformers, cls).from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, mask = _padded(model_type)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a[0].float(), b[0].float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(a[1, :8].float(), b[1, :8].float(), atol=5e-2, rtol=5e-2)


def test_mpnet_head_missing_from_checkpoint_is_initialised(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "mpnet", "MPNetModel")
    with pytest.warns(UserWarning, match="newly initialised.*lm_head.bias"):
        model = loom.MPNetForMaskedLM.from_pretrained(path)
    assert torch.equal(model.lm_head.bias, torch.zeros(99))
