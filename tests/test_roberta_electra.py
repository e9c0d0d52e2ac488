"""BERT's multiple-choice, next-sentence and pretraining heads, RoBERTa (and its XLM-R / CamemBERT aliases) and
ELECTRA against the reference on tiny random checkpoints: every head's outputs on a padded batch, losses, and
save -> reference load round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import loom
from loomtest import TINY, reference_checkpoint


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

    return sorted({(t, cls.__name__) for t in model_types for cls in model_table()[t][1].values()})


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


@pytest.mark.parametrize("model_type,cls", ROBERTA_HEADS)
def test_roberta_save_then_reference_load(tmp_path_factory, tmp_path, model_type, cls):
    import transformers

    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, num_labels=_num_labels(cls))
    getattr(loom, cls).from_pretrained(path).save_pretrained(tmp_path)
    back = getattr(transformers, cls).from_pretrained(tmp_path).eval()
    saved = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (saved.model_type, saved.architectures) == (model_type, [cls])
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
        with pytest.raises(ValueError, match="63 tokens is longer than RoBERTa's 62 positions.*max_position_embed"):
            ours(_ids(T=63))


def test_roberta_mlm_ties_decoder_to_embeddings_and_bias(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "roberta", "RobertaForMaskedLM")
    ours = loom.AutoModelForMaskedLM.from_pretrained(path)
    assert ours.lm_head.decoder.weight is ours.roberta.embeddings.word_embeddings.weight
    assert ours.lm_head.decoder.bias is ours.lm_head.bias
    assert type(loom.AutoModelForPreTraining.from_pretrained(path)) is loom.RobertaForMaskedLM  # as the reference
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


# -- tokenizers and pipelines -----------------------------------------------------------------------------------------
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Le cœur a ses raisons que la raison ne connaît point.",
          "Über den Wolken muss die Freiheit wohl grenzenlos sein.", "¿Dónde está la biblioteca?",
          "Москва — столица России.", "東京は日本の首都です。", "北京欢迎你", "안녕하세요, 만나서 반갑습니다.",
          "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου Κόσμε", "emoji 🤗 and tabs\tand  double  spaces",
          "Numbers 12345 and 3.14159, URLs https://example.com/a?b=c", "Wolfgang lives in Berlin."]


def _legacy_tokenizer_dirs(root):
    """Legacy tokenizer folders trained here: RoBERTa's vocab.json + merges.txt (a byte-level BPE), and an XLM-R and
    a CamemBERT folder holding one SentencePiece unigram model as sentencepiece.bpe.model."""
    import json
    import shutil

    import sentencepiece as spm
    from tokenizers import ByteLevelBPETokenizer

    dirs = {t: root / f"{t}-legacy" for t in ("roberta", "xlm-roberta", "camembert")}
    for d in dirs.values():
        d.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(str(dirs["roberta"]))
    (root / "corpus.txt").write_text("\n".join(CORPUS * 3), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=150,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2)
    for model_type, cls in [("roberta", "RobertaTokenizer"), ("xlm-roberta", "XLMRobertaTokenizer"),
                            ("camembert", "CamembertTokenizer")]:
        if model_type != "roberta":
            shutil.copy(root / "sp.model", dirs[model_type] / "sentencepiece.bpe.model")
        (dirs[model_type] / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls}))
    return dirs


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Per family: the legacy folder, the folder the reference's tokenizer class saves from it (tokenizer.json), and
    the legacy files with only config.json's model_type to say whose they are."""
    import json
    import shutil

    import transformers

    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for model_type, legacy in _legacy_tokenizer_dirs(root).items():
        saved = root / f"{model_type}-saved"
        transformers.AutoTokenizer.from_pretrained(legacy).save_pretrained(saved)
        assert (saved / "tokenizer.json").exists()
        by_model_type = root / f"{model_type}-by-model-type"  # no tokenizer_config.json: config.json names the family
        shutil.copytree(legacy, by_model_type)
        (by_model_type / "tokenizer_config.json").unlink()
        (by_model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        out[model_type] = {"legacy": legacy, "saved": saved, "by-model-type": by_model_type}
    return out


@pytest.mark.parametrize("layout", ["legacy", "saved", "by-model-type"])
@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "camembert"])
def test_tokenizer_ids_equal_reference(tokenizer_dirs, model_type, layout):
    import transformers

    path = tokenizer_dirs[model_type][layout]
    ours, ref = loom.AutoTokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in CORPUS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == \
            ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    assert dict(ours(CORPUS[0], CORPUS[4])) == dict(ref(CORPUS[0], CORPUS[4]))
    batch_a = ours(CORPUS, padding=True)
    batch_b = ref(CORPUS, padding=True)
    assert batch_a["input_ids"] == batch_b["input_ids"] and batch_a["attention_mask"] == batch_b["attention_mask"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref)


def _model_with_tokenizer(tmp_path_factory, model_type, cls, tokenizer_dir, **overrides):
    import shutil

    import transformers

    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls, vocab_size=vocab, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


PIPELINE_CASES = [("fill-mask", "MaskedLM", {}), ("text-classification", "SequenceClassification", {}),
                  ("token-classification", "TokenClassification", {"aggregation_strategy": "simple"}),
                  ("feature-extraction", "Model", {})]  # the reference has no question-answering pipeline now


def _pipeline_text(task: str, mask_token: str) -> list[str]:
    if task == "fill-mask":
        return [f"The quick brown {mask_token} jumps.", f"Le cœur a ses {mask_token} que la raison."]
    return CORPUS[:4] + CORPUS[-1:]


@pytest.mark.parametrize("task,head,kwargs", PIPELINE_CASES)
@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "camembert", "electra", "deberta-v2"])
def test_pipelines_match_reference(tmp_path_factory, tokenizer_dirs, minilm_dir, model_type, task, head, kwargs):
    import transformers

    from pipelines.test_text_tasks import assert_same

    prefix = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert", "electra": "Electra",
              "deberta-v2": "DebertaV2"}
    labels = {"id2label": {0: "O", 1: "B-PER", 2: "I-PER"}, "label2id": {"O": 0, "B-PER": 1, "I-PER": 2}}
    if model_type in ("electra", "deberta-v2"):  # WordPiece (ELECTRA ships BERT's; DeBERTa here for its heads)
        tokenizer_dir = minilm_dir
    else:
        tokenizer_dir = tokenizer_dirs[model_type]["saved"]
    cls = f"{prefix[model_type]}Model" if head == "Model" else f"{prefix[model_type]}For{head}"
    path = _model_with_tokenizer(tmp_path_factory, model_type, cls, tokenizer_dir,
                                 num_labels=3, **labels)
    transformers.logging.set_verbosity_error()
    ref = transformers.pipeline(task, model=str(path), device="cpu")
    ours = loom.pipeline(task, model=str(path))
    for text in _pipeline_text(task, ref.tokenizer.mask_token):
        if task == "feature-extraction":  # nested lists of floats: compare as arrays
            np.testing.assert_allclose(np.array(ours(text)), np.array(ref(text)), atol=1e-4, rtol=1e-4)
        else:
            assert_same(ours(text, **kwargs), ref(text, **kwargs))


@pytest.mark.parametrize("model_type,cls", [("bert", "BertForMaskedLM"), ("bert", "BertForPreTraining"),
                                            ("roberta", "RobertaForMaskedLM"), ("electra", "ElectraForMaskedLM")])
def test_resized_vocabulary_keeps_old_logits_and_reloads_in_reference(tmp_path_factory, tmp_path, model_type, cls):
    """The LM bias kept outside the decoder grows with the vocabulary (it stayed at the old size before)."""
    import transformers

    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls)
    ours = getattr(loom, cls).from_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        before = _first_logits(ours(ids))
        ours.resize_token_embeddings(120)
        after = _first_logits(ours(ids))
    assert after.shape[-1] == 120
    torch.testing.assert_close(after[..., :99], before)
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, cls).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_first_logits(back(ids)), after, atol=1e-4, rtol=1e-4)


def _first_logits(out):
    return out["logits"] if "logits" in out else out["prediction_logits"]


def test_multiple_choice_refuses_unstacked_inputs(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "roberta", "RobertaForMultipleChoice")
    ours = loom.RobertaForMultipleChoice.from_pretrained(path)
    with pytest.raises(ValueError, match=r"input_ids of shape \(batch, num_choices, seq_len\).*got \(2, 12\)"):
        ours(_ids())


def test_roberta_decoder_configs_are_refused_by_name(tmp_path_factory):
    """(BERT runs as a decoder: test_bert_decoder.py; RoBERTa's decoder positions are not implemented.)"""
    path, _ = reference_checkpoint(tmp_path_factory, "roberta", "RobertaForCausalLM", is_decoder=True)
    with pytest.raises(ValueError, match="is_decoder=true asks for this encoder as a decoder.*set it to false"):
        loom.RobertaModel.from_pretrained(path)


@pytest.mark.parametrize("cls", ["RobertaModel", "XLMRobertaForSequenceClassification", "ElectraForPreTraining",
                                 "BertForMultipleChoice"])
def test_tensor_parallel_plan_covers_every_layer(cls):
    """tp_plan="auto" names each layer's six projections under the family's own prefix (a plan written for `bert.`
    would match nothing in a RoBERTa or ELECTRA model)."""
    from loom.auto import model_table
    from loom.distributed.tensor_parallel import resolve_plan

    model_type = next(t for t, (_, heads) in model_table().items() if cls in {c.__name__ for c in heads.values()})
    model = getattr(loom, cls)(loom.AutoConfig.for_model(model_type, **TINY[model_type]))
    plan = resolve_plan(model)
    assert len(plan) == 6 * TINY[model_type]["num_hidden_layers"]
    assert sum(style == "rowwise" for style in plan.values()) == 2 * TINY[model_type]["num_hidden_layers"]


@pytest.mark.parametrize("model_type,base,head", [("roberta", "RobertaModel", "RobertaForMaskedLM"),
                                                  ("xlm-roberta", "XLMRobertaModel", "XLMRobertaForMaskedLM"),
                                                  ("deberta-v2", "DebertaV2Model", "DebertaV2ForMaskedLM")])
def test_masked_lm_head_from_a_base_checkpoint_runs_with_its_bias_tied(tmp_path_factory, model_type, base, head):
    """The head's new bias and the decoder's tied copy of it are one tensor (the copy stayed on meta before)."""
    path, _ = reference_checkpoint(tmp_path_factory, model_type, base)
    with pytest.warns(UserWarning, match="newly initialised"):
        ours = getattr(loom, head).from_pretrained(path)
    assert not any(p.is_meta for p in ours.parameters())
    decoder = ours.get_output_embeddings()
    assert decoder.bias is not None and not decoder.bias.is_meta and not decoder.bias.any()
    with torch.no_grad():
        assert torch.isfinite(ours(_ids()).logits).all()
