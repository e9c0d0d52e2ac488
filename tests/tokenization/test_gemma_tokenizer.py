"""Gemma's tokenizer class pads on the left in the reference (a class default, not a file setting), with <bos>,
<eos>, <unk> and <pad> as its special tokens; loom's family table says the same."""
from __future__ import annotations

import json

import pytest

import loom


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory):
    """A small byte-fallback BPE in Gemma's tokenizer.json shape ('▁' for spaces, <bos> prepended)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world, a b c"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    folder = tmp_path_factory.mktemp("gemma_tok")
    tok.save(str(folder / "tokenizer.json"))
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
