"""train_new_from_iterator against the reference, for WordPiece (BERT), byte-level BPE (GPT-2, RoBERTa) and Unigram
(T5) pipelines. The `tokenizers` trainers break ties between equally frequent merges differently from run to run
(the reference's own two runs differ), so the comparison is of what is deterministic: vocabulary size, special
tokens and their ids, where the post-processor puts them, and the decoded text."""
from __future__ import annotations

import json

import pytest
import tokenizers
import transformers

import loom
from loom.tokenization.training import _emptied_model

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Tokenizers train fast; vocabularies stay small!",
          "naïve café, 東京 and 123 numbers", "a b ab abc abcd"] * 20


@pytest.mark.parametrize("name", ["minilm", "gpt2", "roberta", "t5"])
def test_trained_tokenizer_matches_reference(loom_tok, reference, name):
    kwargs = dict(vocab_size=300, length=len(CORPUS))
    if name == "minilm":
        kwargs.update(new_special_tokens=["<extra>"])
    ours = loom_tok(name).train_new_from_iterator(iter(CORPUS), **kwargs)
    theirs = reference(name).train_new_from_iterator(iter(CORPUS), **kwargs)
    assert type(ours) is type(loom_tok(name))
    assert len(ours) == len(theirs) and len(ours.get_vocab()) == len(theirs.get_vocab())
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids
    for text in CORPUS[:4] + ["<mask> fox <extra>"]:
        got, expected = ours(text, "pair text"), theirs(text, "pair text")
        special = set(ours.all_special_ids)
        assert [i if i in special else None for i in got.input_ids][:1] == \
            [i if i in special else None for i in expected.input_ids][:1]
        assert ours.decode(got.input_ids) == theirs.decode(expected.input_ids)


def test_special_tokens_map_renames(loom_tok):
    new = loom_tok("minilm").train_new_from_iterator(iter(CORPUS), vocab_size=200,
                                                     special_tokens_map={"[MASK]": "<mask>"})
    assert new.mask_token == "<mask>" and "[MASK]" not in new.get_vocab()
    ids = new("fox <mask>").input_ids
    assert new.convert_ids_to_tokens([ids[0], ids[-2], ids[-1]]) == ["[CLS]", "<mask>", "[SEP]"]


def test_toy_bpe_without_pre_tokenizer_or_post_processor():
    engine = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 1, "b": 2, "ab": 3}, merges=[("a", "b")]))
    engine.pre_tokenizer = None
    for module in (loom, transformers):
        new = module.PreTrainedTokenizerFast(tokenizer_object=engine).train_new_from_iterator(
            ("a" for _ in range(100)), length=100, vocab_size=50)
        assert new.get_vocab() == {"a": 0}


def test_word_level_trains_and_unknown_models_are_a_value_error():
    engine = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    engine.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = loom.PreTrainedTokenizerFast(tokenizer_object=engine)
    assert tok.train_new_from_iterator(["a a b"], vocab_size=10).get_vocab().keys() >= {"a", "b"}
    state = engine.to_str().replace('"WordLevel"', '"Nope"')
    with pytest.raises(ValueError, match="trains BPE, Unigram, WordLevel and WordPiece"):
        _emptied_model(json.loads(state)["model"], {}, {})
