"""Fixtures for the pipeline tests: tiny random checkpoints of each head, saved by the reference library with the
real MiniLM tokenizer beside them (vocabulary 30522), so loom and the reference run on identical files."""
from __future__ import annotations

import shutil

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
SENTIMENT_LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=128, type_vocab_size=2, initializer_range=0.5)  # wide init: decisive scores


def reference_checkpoint(tmp_path_factory, model_type: str, ref_class: str, seed: int = 0, **config):
    """A random reference model of `ref_class` saved into a tmp dir (the same recipe as tests/conftest.py)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, ref_class)(transformers.AutoConfig.for_model(model_type, **config)).eval()
    path = tmp_path_factory.mktemp(ref_class)
    model.save_pretrained(path)
    return path, model


def with_minilm_tokenizer(path, minilm_dir):
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).exists():
            shutil.copy(minilm_dir / name, path / name)
    return path


def _bert(tmp_path_factory, minilm_dir, ref_class, seed, **overrides):
    if "id2label" in overrides:
        overrides["label2id"] = {v: k for k, v in overrides["id2label"].items()}
    path, _ = reference_checkpoint(tmp_path_factory, "bert", ref_class, seed=seed, **{**BERT, **overrides})
    return with_minilm_tokenizer(path, minilm_dir)


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory, minilm_dir):
    return _bert(tmp_path_factory, minilm_dir, "BertForSequenceClassification", 1, id2label=SENTIMENT_LABELS)


@pytest.fixture(scope="session")
def ner_dir(tmp_path_factory, minilm_dir):
    return _bert(tmp_path_factory, minilm_dir, "BertForTokenClassification", 2, id2label=NER_LABELS)


@pytest.fixture(scope="session")
def mlm_dir(tmp_path_factory, minilm_dir):
    return _bert(tmp_path_factory, minilm_dir, "BertForMaskedLM", 3)


@pytest.fixture(scope="session")
def nli_dir(tmp_path_factory, minilm_dir):
    return _bert(tmp_path_factory, minilm_dir, "BertForSequenceClassification", 4, id2label=NLI_LABELS)


@pytest.fixture(scope="session")
def qa_dir(tmp_path_factory, minilm_dir):
    return _bert(tmp_path_factory, minilm_dir, "BertForQuestionAnswering", 5)


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, minilm_dir):
    """A causal LM over the MiniLM vocabulary, with a small chat template in its tokenizer config."""
    import json

    path, _ = reference_checkpoint(tmp_path_factory, "gpt2", "GPT2LMHeadModel", seed=6, vocab_size=30522, n_embd=32,
                                   n_layer=2, n_head=4, n_positions=64, initializer_range=0.5, bos_token_id=101,
                                   eos_token_id=102, pad_token_id=0)
    with_minilm_tokenizer(path, minilm_dir)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def reference_pipeline():
    """Build a reference pipeline (the parity oracle), quietly."""
    import transformers

    transformers.logging.set_verbosity_error()

    cache = {}

    def build(task, path, **kwargs):
        key = (task, str(path), repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = transformers.pipeline(task, model=str(path), tokenizer=str(path), device="cpu", **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def loom_pipeline():
    """loom pipelines, built once per (task, checkpoint, arguments) for the whole session."""
    import loom

    cache = {}

    def build(task, path=None, **kwargs):
        key = (task, str(path), repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = loom.pipeline(task, model=None if path is None else str(path), **kwargs)
        return cache[key]

    return build
