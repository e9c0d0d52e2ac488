"""Ids, masks, type ids, offsets, special-token masks, overflow and decoding equal to the reference's AutoTokenizer."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tok_data import CORPUS

ASSETS = ["minilm", "minilm_vocab", "gpt2", "roberta", "llama3", "llama3_chat", "spm_unigram", "spm_bpe",
          "spm_bpe_llama", "t5"]
PAIRS = list(zip(CORPUS, reversed(CORPUS)))


def _plain(value):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    return value


def _outcome(tok, *args, **kwargs):
    """The call's result as plain data, or the fact that it raised."""
    try:
        out = tok(*args, **kwargs)
    except Exception:
        return "raised"
    result = {k: _plain(v) for k, v in out.items()}
    if out.encodings:
        result["word_ids"] = [e.word_ids for e in out.encodings]
        result["sequence_ids"] = [e.sequence_ids for e in out.encodings]
    return result


@pytest.mark.parametrize("name", ASSETS)
def test_singles_and_pairs_all_outputs(name, reference, loom_tok):
    ref, tok = reference(name), loom_tok(name)
    options = dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_length=True,
                   return_token_type_ids=True)
    for args in ([CORPUS], [list(CORPUS), list(reversed(CORPUS))]):
        assert _outcome(tok, *args, **options) == _outcome(ref, *args, **options)
    for text in CORPUS[:8]:  # unbatched calls drop the batch axis
        assert _outcome(tok, text, **options) == _outcome(ref, text, **options)
        assert _outcome(tok, text, "second part", **options) == _outcome(ref, text, "second part", **options)
    assert tok.get_vocab() == ref.get_vocab()
    assert len(tok) == len(ref) and tok.vocab_size == ref.vocab_size
    assert tok.all_special_tokens == ref.all_special_tokens and tok.all_special_ids == ref.all_special_ids
    assert tok.special_tokens_map == ref.special_tokens_map
    assert tok.pad_token_id == ref.pad_token_id and tok.padding_side == ref.padding_side


@pytest.mark.parametrize("name", ASSETS)
def test_padding_and_truncation_combinations(name, reference, loom_tok):
    ref, tok = reference(name), loom_tok(name)
    texts = CORPUS[:6] + CORPUS[-3:]
    combos = itertools.product([False, True, "max_length"], [None, True, "only_first", "only_second"],
                               ["right", "left"], [None, 8])
    for padding, truncation, side, multiple in combos:
        if truncation is not None and padding and multiple:
            multiple = 8  # max_length below is a multiple of 8, as truncation with padding requires
        options = dict(padding=padding, truncation=truncation, max_length=16, padding_side=side,
                       pad_to_multiple_of=multiple, return_special_tokens_mask=True, return_offsets_mapping=True)
        for args in ([texts], [texts, list(reversed(texts))]):
            expected = _outcome(ref, *args, **options)
            assert _outcome(tok, *args, **options) == expected, (padding, truncation, side, multiple, len(args))


@pytest.mark.parametrize("name", ASSETS)
def test_overflow_with_stride(name, reference, loom_tok):
    ref, tok = reference(name), loom_tok(name)
    texts = [CORPUS[-1][:200], CORPUS[1], CORPUS[2]]  # pair overflow grows as a product: keep texts short
    for truncation, args in [(True, [texts]), ("only_first", [texts, ["short"] * 3]),
                             ("only_second", [["short"] * 3, texts]), ("longest_first", [texts[1:], texts[1:]])]:
        options = dict(truncation=truncation, max_length=12, stride=3, return_overflowing_tokens=True,
                       return_offsets_mapping=True, padding=tok.pad_token is not None)
        result = _outcome(tok, *args, **options)
        assert result == _outcome(ref, *args, **options)
        assert result != "raised" and len(result["overflow_to_sample_mapping"]) > len(texts)


PAD_FOR = {"gpt2": "<|endoftext|>", "llama3_chat": "<|end_of_text|>", "spm_unigram": "<unk>"}


@pytest.mark.parametrize("name", ["minilm", "minilm_vocab", "spm_bpe_llama", "roberta", "t5", *PAD_FOR])
def test_tensors_match(name, reference, loom_tok, assets):
    ref, tok = reference(name), loom_tok(name)
    if name in PAD_FOR:  # batched tensors need a pad token; load copies that have one
        from transformers import AutoTokenizer as RefAutoTokenizer

        from loom.tokenization import AutoTokenizer

        ref = RefAutoTokenizer.from_pretrained(str(assets[name]), pad_token=PAD_FOR[name])
        tok = AutoTokenizer.from_pretrained(str(assets[name]), pad_token=PAD_FOR[name])
    for side, kind in [("right", "pt"), ("left", "pt"), ("right", "np")]:
        options = dict(padding=True, truncation=True, max_length=64, return_tensors=kind, padding_side=side)
        ours, theirs = tok(CORPUS, **options), ref(CORPUS, **options)
        assert set(ours) == set(theirs)
        for key in theirs:
            assert type(ours[key]) is type(theirs[key]) and ours[key].dtype == theirs[key].dtype, key
            assert ours[key].tolist() == theirs[key].tolist(), key
        pair = (CORPUS, list(reversed(CORPUS)))
        assert {k: v.tolist() for k, v in tok(*pair, **options).items()} == \
               {k: v.tolist() for k, v in ref(*pair, **options).items()}


@pytest.mark.parametrize("name", ASSETS)
def test_pretokenized_words(name, reference, loom_tok):
    ref, tok = reference(name), loom_tok(name)
    words = [t.split() for t in CORPUS if t.split()]
    options = dict(is_split_into_words=True, return_offsets_mapping=True)
    assert _outcome(tok, words, **options) == _outcome(ref, words, **options)
    assert _outcome(tok, words[0], **options) == _outcome(ref, words[0], **options)
    assert _outcome(tok, words[:4], words[4:8], **options) == _outcome(ref, words[:4], words[4:8], **options)


@pytest.mark.parametrize("name", ASSETS)
def test_decode_and_tokens(name, reference, loom_tok):
    ref, tok = reference(name), loom_tok(name)
    ids = ref(CORPUS)["input_ids"]
    for skip in (False, True):
        assert tok.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        for row in ids[:6]:
            assert tok.decode(row, skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip)
            assert tok.decode(torch.tensor(row), skip_special_tokens=skip) == ref.decode(row,
                                                                                         skip_special_tokens=skip)
    for row in ids[:6]:
        assert tok.decode(row, clean_up_tokenization_spaces=True) == ref.decode(row, clean_up_tokenization_spaces=True)
        assert tok.convert_ids_to_tokens(row) == ref.convert_ids_to_tokens(row)
        assert tok.convert_ids_to_tokens(row, skip_special_tokens=True) == \
               ref.convert_ids_to_tokens(row, skip_special_tokens=True)
    for text in CORPUS[:10]:
        tokens = ref.tokenize(text)
        assert tok.tokenize(text) == tokens
        assert tok.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
        assert tok.encode(text) == ref.encode(text)
    assert tok.convert_tokens_to_ids("definitely-not-a-token-xyz") == ref.convert_tokens_to_ids(
        "definitely-not-a-token-xyz")


@pytest.mark.parametrize("name", ["minilm", "spm_bpe_llama", "gpt2"])
def test_split_special_tokens(name, reference, loom_tok):
    ref, tok = reference(name), loom_tok(name)
    text = CORPUS[17]
    for split in (False, True):
        assert tok(text, split_special_tokens=split)["input_ids"] == ref(text, split_special_tokens=split)["input_ids"]


def test_legacy_wordpiece_equals_tokenizer_json(loom_tok):
    fast, legacy = loom_tok("minilm"), loom_tok("minilm_vocab")
    assert fast(CORPUS, CORPUS[::-1], return_offsets_mapping=True).data == \
           legacy(CORPUS, CORPUS[::-1], return_offsets_mapping=True).data
