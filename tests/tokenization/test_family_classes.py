"""The reference's per-family tokenizer classes, built from their vocabulary files, against the reference."""
from __future__ import annotations

import json

import pytest
import transformers

import loom

TEXTS = ["hello world", "Hello, wörld! [MASK] ab"]


@pytest.fixture
def vocab_txt(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "hello", "world", ",",
                                                "!", "w", "##ö", "##rld", "ab"]), encoding="utf-8")
    return path


@pytest.fixture
def bpe_files(tmp_path):
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġab": 5, "h": 6, "i": 7, "hi": 8}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nh i\nĠ ab\n", encoding="utf-8")
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


@pytest.mark.parametrize("name", ["BertTokenizer", "BertTokenizerFast", "DistilBertTokenizer", "ElectraTokenizer"])
def test_wordpiece_classes_match_reference(vocab_txt, name):
    ours, theirs = getattr(loom, name)(vocab_txt), getattr(transformers, name)(str(vocab_txt))
    for text in TEXTS:
        assert ours(text).data == theirs(text).data
        assert ours(text, "ab").data == theirs(text, "ab").data
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert (ours.pad_token_id, ours.mask_token_id, len(ours)) == (theirs.pad_token_id, theirs.mask_token_id,
                                                                  len(theirs))
    assert ours.model_input_names == theirs.model_input_names


@pytest.mark.parametrize("name", ["GPT2Tokenizer", "GPT2TokenizerFast", "RobertaTokenizer"])
def test_bpe_classes_match_reference(bpe_files, name):
    kwargs = {"unk_token": "<|endoftext|>"} if name == "RobertaTokenizer" else {}
    files = [str(f) for f in bpe_files]
    ours, theirs = getattr(loom, name)(*files, **kwargs), getattr(transformers, name)(*files, **kwargs)
    for text in ["ab hi", "hiab ab"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.eos_token == theirs.eos_token


def test_fast_names_are_the_same_classes_and_load_pretrained(vocab_txt):
    assert loom.BertTokenizerFast is loom.BertTokenizer and loom.LlamaTokenizerFast is loom.LlamaTokenizer
    saved = loom.BertTokenizer(vocab_txt).save_pretrained(vocab_txt.parent / "saved")
    assert saved
    again = loom.BertTokenizer.from_pretrained(vocab_txt.parent / "saved")
    assert isinstance(again, loom.BertTokenizer) and again("hello").input_ids == [1, 5, 2]


def test_missing_files_are_a_value_error(bpe_files):
    with pytest.raises(ValueError, match="needs vocab_file="):
        loom.BertTokenizer()
    with pytest.raises(ValueError, match="merges_file="):
        loom.GPT2Tokenizer(bpe_files[0])


def test_strategy_enums_match_reference(vocab_txt):
    from transformers.utils import PaddingStrategy as RefPadding, TensorType as RefTensorType

    from loom.tokenization import PaddingStrategy, TruncationStrategy

    assert loom.TensorType("pt") is loom.TensorType.PYTORCH and loom.TensorType("np") is loom.TensorType.NUMPY
    assert {m.name: m.value for m in PaddingStrategy} == {m.name: m.value for m in RefPadding}
    assert [m.value for m in loom.TensorType] == [RefTensorType.PYTORCH.value, RefTensorType.NUMPY.value]
    with pytest.raises(ValueError):
        loom.TensorType("tf")  # loom returns PyTorch tensors or NumPy arrays only
    tok = loom.BertTokenizer(vocab_txt)
    batch = tok(["hello", "hello world"], padding=PaddingStrategy.LONGEST, truncation=TruncationStrategy.LONGEST_FIRST,
                max_length=3, return_tensors=loom.TensorType.NUMPY)
    assert batch["input_ids"].shape == (2, 3)
