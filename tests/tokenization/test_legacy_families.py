"""RoBERTa- and T5-style legacy files with their loading options, equal to the reference's AutoTokenizer."""
from __future__ import annotations

import pytest

from tok_data import CORPUS

PAIRS = (CORPUS[:8], CORPUS[8:16])
OPTIONS = dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_token_type_ids=True)


def _both(assets, name: str, **kwargs):
    from transformers import AutoTokenizer as RefAutoTokenizer

    from loom.tokenization import AutoTokenizer

    return (AutoTokenizer.from_pretrained(str(assets[name]), **kwargs),
            RefAutoTokenizer.from_pretrained(str(assets[name]), **kwargs))


@pytest.mark.parametrize("kwargs", [dict(add_prefix_space=True), dict(trim_offsets=False),
                                    dict(add_prefix_space=True, trim_offsets=False)])
def test_roberta_options(assets, kwargs):
    tok, ref = _both(assets, "roberta", **kwargs)
    assert str(tok.backend_tokenizer.post_processor) == str(ref.backend_tokenizer.post_processor)
    for args in ([CORPUS], PAIRS):
        assert tok(*args, **OPTIONS).data == ref(*args, **OPTIONS).data
    words = [t.split() for t in CORPUS if t.split()]
    assert tok(words, is_split_into_words=True, **OPTIONS).data == ref(words, is_split_into_words=True, **OPTIONS).data


def test_roberta_pair_layout(loom_tok):
    tok = loom_tok("roberta")
    ids = tok("a", "b")["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert ids[0] == cls and ids[-1] == sep and ids.count(sep) == 3 and ids[ids.index(sep) + 1] == sep


@pytest.mark.parametrize("kwargs", [dict(extra_ids=0), dict(extra_ids=7),
                                    dict(additional_special_tokens=["<custom>"], extra_ids=3)])
def test_t5_sentinels(assets, kwargs):
    tok, ref = _both(assets, "t5", **kwargs)
    assert tok.get_vocab() == ref.get_vocab() and len(tok) == len(ref)
    assert tok.all_special_tokens == ref.all_special_tokens and tok.all_special_ids == ref.all_special_ids
    text = [t + " <extra_id_0> x <extra_id_2>" for t in CORPUS[:6]]
    assert tok(text, **OPTIONS).data == ref(text, **OPTIONS).data
    ids = ref(text)["input_ids"]
    assert tok.batch_decode(ids) == ref.batch_decode(ids)


def test_t5_appends_eos_only(loom_tok, reference):
    tok = loom_tok("t5")
    ids = tok("hello world")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    assert tok("a", "b", return_token_type_ids=True)["token_type_ids"] == \
           reference("t5")("a", "b", return_token_type_ids=True)["token_type_ids"]


def test_t5_sentinel_count_mismatch_is_an_error(assets):
    from loom.tokenization import AutoTokenizer

    with pytest.raises(ValueError, match="extra_ids=5 but the additional special tokens"):
        AutoTokenizer.from_pretrained(str(assets["t5"]), extra_ids=5,
                                      additional_special_tokens=["<extra_id_0>", "<extra_id_1>"])
    with pytest.raises(ValueError, match="extra_ids must be an int"):
        AutoTokenizer.from_pretrained(str(assets["t5"]), extra_ids="many")


def test_family_without_its_sequence_tokens_is_an_error(assets):
    from loom.tokenization import AutoTokenizer

    with pytest.raises(ValueError, match="RoBERTa puts sep_token around every sequence, but sep_token=None"):
        AutoTokenizer.from_pretrained(str(assets["roberta"]), sep_token=None)
    with pytest.raises(ValueError, match="T5 puts eos_token around every sequence, but eos_token=None"):
        AutoTokenizer.from_pretrained(str(assets["t5"]), eos_token=None)
