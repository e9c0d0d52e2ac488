"""BatchEncoding, special tokens, pad(), saving, model_max_length, legacy conversion details and bad input."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tok_data import CORPUS

from loom.tokenization import AutoTokenizer, BatchEncoding, PreTrainedTokenizerFast


def test_batch_encoding_access_and_alignment(loom_tok, reference):
    tok, ref = loom_tok("minilm"), reference("minilm")
    text, pair = "Hello wonderful world", "second one"
    ours, theirs = tok([text], [pair], return_tensors="pt"), ref([text], [pair], return_tensors="pt")
    assert ours.input_ids is ours["input_ids"] and isinstance(ours, BatchEncoding)
    with pytest.raises(AttributeError, match="no key or attribute 'nope'"):
        ours.nope
    assert ours.word_ids(0) == theirs.word_ids(0) and ours.sequence_ids(0) == theirs.sequence_ids(0)
    assert ours.tokens(0) == theirs.tokens(0)
    for i in range(len(ours.tokens(0))):
        assert ours.token_to_chars(0, i) == theirs.token_to_chars(0, i)
    for c in range(len(text)):
        assert ours.char_to_token(0, c) == theirs.char_to_token(0, c)
        assert ours.char_to_word(0, c) == theirs.char_to_word(0, c)
    assert ours.char_to_token(0, 0, sequence_index=1) == theirs.char_to_token(0, 0, sequence_index=1)
    assert ours.word_to_tokens(0, 1) == theirs.word_to_tokens(0, 1)
    moved = ours.to("cpu")
    assert moved is ours and moved["input_ids"].device.type == "cpu"
    with pytest.raises(TypeError, match="device"):
        ours.to(torch.float16)
    assert len(ours.encodings) == 1 and ours[0].ids == theirs[0].ids
    single = tok(text)
    assert single.token_to_chars(1) == ref(text).token_to_chars(1)


def test_lazily_padded_encodings_match_reference(loom_tok, reference):
    tok, ref = loom_tok("minilm"), reference("minilm")
    ours = tok(["a", "a much longer sentence here"], padding=True, padding_side="left")
    theirs = ref(["a", "a much longer sentence here"], padding=True, padding_side="left")
    assert [e.ids for e in ours.encodings] == [e.ids for e in theirs.encodings]
    assert ours.word_ids(0) == theirs.word_ids(0)


@pytest.mark.parametrize("name", ["minilm", "gpt2", "t5"])
def test_encodings_without_requested_offsets_still_have_them(name, loom_tok, reference):
    # ids come from an offsets-free engine pass; the encodings are rebuilt with offsets when first touched,
    # under this call's settings even after another call changed the engine's truncation
    tok, ref = loom_tok(name), reference(name)
    texts = [CORPUS[2], CORPUS[5], CORPUS[-1][:120]]
    options = dict(truncation=True, max_length=16, return_special_tokens_mask=True)
    ours, theirs = tok(texts, texts[::-1], **options), ref(texts, texts[::-1], **options)
    tok(texts, truncation=True, max_length=5)
    assert ours.data == theirs.data
    for e, r in zip(ours.encodings, theirs.encodings):
        assert (e.ids, e.offsets, e.word_ids, e.sequence_ids) == (r.ids, r.offsets, r.word_ids, r.sequence_ids)
    assert [ours.char_to_token(i, 3) for i in range(len(texts))] == [theirs.char_to_token(i, 3) for i in range(3)]


@pytest.mark.parametrize("name", ["minilm", "gpt2", "llama3_chat", "spm_bpe_llama", "t5"])
def test_offsets_free_pass_equals_full_pass(name, loom_tok):
    tok = loom_tok(name)
    texts = CORPUS[:6] + CORPUS[-3:]
    for truncation, args in [(None, [texts]), (True, [texts]), (True, [texts, texts[::-1]]),
                             ("only_second", [["short one"] * len(texts), texts]),
                             (True, [[t.split() for t in texts if t.split()]])]:
        options = dict(truncation=truncation, max_length=24, return_special_tokens_mask=True,
                       return_token_type_ids=True, return_length=True, is_split_into_words=isinstance(args[0][0], list))
        fast, full = tok(*args, **options), tok(*args, return_offsets_mapping=True, **options)
        assert fast.data == {k: v for k, v in full.data.items() if k != "offset_mapping"}, (truncation, len(args))


def test_special_tokens_and_added_tokens(assets, reference):
    from transformers import AutoTokenizer as RefAutoTokenizer

    tok, ref = AutoTokenizer.from_pretrained(assets["gpt2"]), RefAutoTokenizer.from_pretrained(str(assets["gpt2"]))
    assert tok.add_tokens(["newword", "<extra>"]) == ref.add_tokens(["newword", "<extra>"]) == 2
    assert tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<tool>"]}) == \
           ref.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<tool>"]})
    text = "a newword and <extra><tool> then <pad> end"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.pad_token_id == ref.pad_token_id and len(tok) == len(ref)
    assert tok.all_special_tokens == ref.all_special_tokens
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == \
           ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    tok.pad_token_id = tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="not a special token name"):
        tok.add_special_tokens({"banana_token_x": 3})
    with pytest.raises(TypeError, match="add_tokens takes str"):
        tok.add_tokens([3])


def test_pad_for_collators(loom_tok, reference):
    tok, ref = loom_tok("minilm"), reference("minilm")
    features = [tok(t) for t in ["hello world", "a", "a longer sentence with several words"]]
    ref_features = [ref(t) for t in ["hello world", "a", "a longer sentence with several words"]]
    for options in [dict(), dict(padding="max_length", max_length=16), dict(pad_to_multiple_of=8),
                    dict(padding_side="left", return_tensors="pt")]:
        ours, theirs = tok.pad(features, **options), ref.pad(ref_features, **options)
        assert {k: np.asarray(v).tolist() for k, v in ours.items()} == \
               {k: np.asarray(v).tolist() for k, v in theirs.items()}, options
    no_mask = [{"input_ids": f["input_ids"]} for f in features]
    assert "attention_mask" not in tok.pad(no_mask, return_attention_mask=False)
    assert tok.pad(no_mask).data == ref.pad(no_mask).data
    as_tensors = [{"input_ids": torch.tensor(f["input_ids"])} for f in features]
    assert isinstance(tok.pad(as_tensors)["input_ids"], torch.Tensor)
    with pytest.raises(ValueError, match="include 'input_ids'"):
        tok.pad([{"labels": [1]}])


def test_pad_without_attention_mask_keeps_an_existing_one(loom_tok, reference):
    tok, ref = loom_tok("minilm"), reference("minilm")
    with_mask = [{"input_ids": [101, 7, 8, 102], "attention_mask": [1, 1, 1, 1]},
                 {"input_ids": [101, 102], "attention_mask": [1, 1]}]
    without = [{"input_ids": f["input_ids"]} for f in with_mask]
    for features in (with_mask, without, with_mask[0], with_mask[:1] * 2):
        for options in [dict(), dict(padding="max_length", max_length=6), dict(padding_side="left")]:
            ours = tok.pad(copy.deepcopy(features), return_attention_mask=False, **options)
            # the reference pads a single dict in place, so it gets its own copy
            theirs = ref.pad(copy.deepcopy(features), return_attention_mask=False, **options)
            assert ours.data == theirs.data, (features, options)
    assert tok.pad(with_mask, return_attention_mask=False)["attention_mask"] == [[1, 1, 1, 1], [1, 1]]
    same_length = [with_mask[0], {"input_ids": [101, 5, 6, 102], "attention_mask": [1, 1, 1, 0]}]
    ours = tok.pad(same_length, return_attention_mask=False, return_tensors="pt")
    theirs = ref.pad(same_length, return_attention_mask=False, return_tensors="pt")
    assert {k: v.tolist() for k, v in ours.items()} == {k: v.tolist() for k, v in theirs.items()}
    with pytest.raises(ValueError):
        ref.pad(with_mask, return_attention_mask=False, return_tensors="pt")
    with pytest.raises(ValueError, match="leaves the features' existing 'attention_mask' unpadded"):
        tok.pad(with_mask, return_attention_mask=False, return_tensors="pt")


def test_save_pretrained_round_trip_both_libraries(tmp_path, assets, reference):
    from transformers import AutoTokenizer as RefAutoTokenizer

    from tok_data import CHATML_TEMPLATE

    for name in ["minilm_vocab", "gpt2", "roberta", "spm_unigram", "spm_bpe_llama", "t5"]:
        tok = AutoTokenizer.from_pretrained(assets[name])
        tok.add_tokens(["brandnewtoken"])
        if name == "spm_unigram":
            tok.chat_template = CHATML_TEMPLATE
        out = tmp_path / name
        files = tok.save_pretrained(out)
        assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
        assert all(str(out) in f for f in files)
        again, ref = AutoTokenizer.from_pretrained(out), RefAutoTokenizer.from_pretrained(str(out))
        texts = CORPUS + ["brandnewtoken inside"]
        expected = tok(texts, return_offsets_mapping=True).data
        assert again(texts, return_offsets_mapping=True).data == expected
        ref_out = ref(texts, return_offsets_mapping=True)
        assert {k: ref_out[k] for k in expected} == expected, name
        assert again.chat_template == tok.chat_template and again.model_max_length == tok.model_max_length
        if tok.chat_template:
            assert (out / "chat_template.jinja").read_text() == tok.chat_template
            assert ref.chat_template == tok.chat_template


def test_save_arguments_are_honoured_or_refused(tmp_path, assets, reference):
    """save_jinja_files=False keeps the template inside tokenizer_config.json (as the reference writes it then);
    legacy_format=True (slow-tokenizer files) and unknown keywords are errors, never ignored."""
    from tok_data import CHATML_TEMPLATE

    tok = AutoTokenizer.from_pretrained(assets["minilm_vocab"])
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(tmp_path / "inline", save_jinja_files=False)
    assert not (tmp_path / "inline" / "chat_template.jinja").exists()
    assert json.loads((tmp_path / "inline" / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    assert AutoTokenizer.from_pretrained(tmp_path / "inline").chat_template == CHATML_TEMPLATE
    with pytest.raises(ValueError, match=r"legacy_format=True\) is not supported: loom writes the tokenizer.json"):
        tok.save_pretrained(tmp_path / "legacy", legacy_format=True)
    with pytest.raises(TypeError, match="keyword arguments loom does not support: bogus; remove them"):
        tok.save_pretrained(tmp_path / "bogus", bogus=True)
    with pytest.raises(ValueError, match="repo_id only apply to an upload; pass push_to_hub=True"):
        tok.save_pretrained(tmp_path / "repo", repo_id="me/tok")
    assert not (tmp_path / "legacy").exists() and not (tmp_path / "bogus").exists()


def test_model_max_length_rule(assets, tmp_path, loom_tok):
    assert loom_tok("minilm").model_max_length == 512  # tokenizer_config.json
    assert loom_tok("llama3_chat").model_max_length == 8192  # 1e30 in the config: config.json's positions instead
    assert loom_tok("spm_bpe_llama").model_max_length == 4096
    bare = loom_tok("llama3")
    assert bare.model_max_length == int(1e30)
    with pytest.raises(ValueError, match="model_max_length is unknown"):
        bare("some text", truncation=True)
    with pytest.raises(ValueError, match="model_max_length is unknown"):
        bare("some text", padding="max_length")
    assert len(bare("some text", truncation=True, max_length=2)["input_ids"]) == 2
    assert AutoTokenizer.from_pretrained(assets["llama3"], model_max_length=77).model_max_length == 77
    roberta_like = tmp_path / "roberta_like"
    roberta_like.mkdir()
    (roberta_like / "tokenizer.json").write_text((assets["minilm"] / "tokenizer.json").read_text())
    (roberta_like / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 514}))
    assert AutoTokenizer.from_pretrained(roberta_like).model_max_length == 512
    long = " ".join(["word"] * 600)
    assert len(loom_tok("minilm")(long, truncation=True)["input_ids"]) == 512


def test_spm_reader_matches_protobuf(assets):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from loom.tokenization.spm_proto import read_spm_model

    for name in ["spm_unigram", "spm_bpe"]:
        path = assets[name] / "tokenizer.model"
        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
        ours = read_spm_model(path)
        assert [(p.piece, p.score, p.type) for p in ours.pieces] == \
               [(p.piece, pytest.approx(p.score), p.type) for p in proto.pieces]
        spec = proto.trainer_spec
        assert (ours.model_type, ours.byte_fallback, ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == \
               (spec.model_type, spec.byte_fallback, spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id)
        assert ours.precompiled_charsmap == proto.normalizer_spec.precompiled_charsmap


def test_generic_sentencepiece_equals_sentencepiece_itself(assets, loom_tok):
    import sentencepiece as spm

    for name in ["spm_unigram", "spm_bpe"]:
        processor = spm.SentencePieceProcessor(model_file=str(assets[name] / "tokenizer.model"))
        tok = loom_tok(name)
        for text in CORPUS:
            if "<s>" in text:
                continue  # loom matches special tokens inside text; SentencePiece does not
            assert tok(text, add_special_tokens=False)["input_ids"] == processor.encode(text), (name, text)


def test_llama_legacy_adds_bos_once(loom_tok):
    tok = loom_tok("spm_bpe_llama")
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("bad, error, message", [
    (dict(text=None), ValueError, "specify either `text`"),
    (dict(text=3), TypeError, "text must be a str"),
    (dict(text=["ok", 3]), TypeError, r"text\[1\] must be a str"),
    (dict(text=[[["too", "deep"]]]), TypeError, r"text\[0\] must be a str"),
    (dict(text=[[["too"], ["deep"]]], is_split_into_words=True), TypeError, r"text\[0\] must be a list of words"),
    (dict(text=["a", "b"], text_pair=["c"]), ValueError, "text_pair has 1 entries but the batch has 2"),
    (dict(text=["a", "b"], text_pair="c"), TypeError, "text_pair must be a list"),
    (dict(text="a b c", truncation=True, max_length=1), ValueError, "max_length=1 is shorter than the 2 special"),
    (dict(text="a", return_tensors="tf"), ValueError, "return_tensors='tf' is not supported"),
    (dict(text="a", padding="sideways"), ValueError, "padding='sideways' is not a padding strategy"),
    (dict(text="a", truncation="middle"), ValueError, "truncation='middle' is not a truncation strategy"),
    (dict(text="a", max_length="10"), TypeError, "max_length must be an int"),
    (dict(text="a", bogus_option=1), TypeError, "bogus_option"),
    (dict(text=["a", "a much longer text"], return_tensors="pt"), ValueError, "padding=True"),
    (dict(text="a", padding=True, truncation=True, max_length=10, pad_to_multiple_of=8), ValueError, "multiple"),
])
def test_bad_call_arguments(loom_tok, bad, error, message):
    with pytest.raises(error, match=message):
        loom_tok("minilm")(**bad)


def test_padding_without_pad_token(loom_tok):
    with pytest.raises(ValueError, match="no pad token"):
        loom_tok("gpt2")(["a", "b c"], padding=True)
    with pytest.raises(ValueError, match="no pad token"):
        loom_tok("gpt2").pad([{"input_ids": [1, 2]}, {"input_ids": [3]}])


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(OSError, match="neither an existing directory"):
        AutoTokenizer.from_pretrained(str(tmp_path / "does" / "not" / "exist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="no tokenizer files found"):
        AutoTokenizer.from_pretrained(empty)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(OSError, match="tokenizer.json is not a valid tokenizer.json"):
        AutoTokenizer.from_pretrained(corrupt)
    (corrupt / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(OSError, match="tokenizer_config.json is not valid JSON"):
        AutoTokenizer.from_pretrained(corrupt)
    bad_spm = tmp_path / "bad_spm"
    bad_spm.mkdir()
    (bad_spm / "tokenizer.model").write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(OSError, match="not a valid SentencePiece model"):
        AutoTokenizer.from_pretrained(bad_spm)
    with pytest.raises(ValueError, match="tokenizer_object"):
        PreTrainedTokenizerFast()


def test_import_is_cheap_and_never_loads_the_reference():
    code = ("import sys, loom.tokenization as t; from loom.tokenization import AutoTokenizer; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "assert 'torch' not in sys.modules, 'torch imported at import time'; "
            "assert 'jinja2' not in sys.modules, 'jinja2 imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)
