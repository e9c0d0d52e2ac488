"""Gemma's tokenizer class pads on the left in the reference (a class default, not a file setting), with <bos>,
<eos>, <unk> and <pad> as its special tokens; loom's family table says the same."""
from __future__ import annotations

import json

import pytest

import loom
from loomtest import gemma_like_tokenizer


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma_tok")
    gemma_like_tokenizer(folder)
    return folder


@pytest.mark.parametrize("where", ["tokenizer_class", "model_type"])
def test_gemma_tokenizer_pads_left_with_reference_ids(gemma_like, tmp_path, where):
    import shutil

    import transformers

    shutil.copy(gemma_like / "tokenizer.json", tmp_path / "tokenizer.json")
    if where == "tokenizer_class":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    else:
        (tmp_path / "tokenizer_config.json").write_text("{}")
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    ours, ref = loom.AutoTokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["the quick fox", "hello world"]
    assert ours.padding_side == ref.padding_side == "left"
    assert ours(texts, padding=True)["input_ids"] == ref(texts, padding=True)["input_ids"]
    assert ours(texts, padding=True)["attention_mask"] == ref(texts, padding=True)["attention_mask"]
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name), name
