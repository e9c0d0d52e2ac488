"""Tokenizers from GGUF metadata: `AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives the ids of the reference's
GGUF tokenizer and of the tokenizer the file was made from, on the multilingual corpus: Llama 3's byte-level BPE
(llama.cpp's `gpt2` vocabulary) and a SentencePiece BPE model (its `llama` vocabulary)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the GGUF tests write their files with the gguf package (pip install gguf)")

from ggufwrite import llama3_tokenizer_metadata, sentencepiece_metadata, truncated_bpe, write_gguf  # noqa: E402
from tok_data import CORPUS  # noqa: E402

from loom import AutoTokenizer  # noqa: E402


def _gguf_with_tokenizer(folder: Path, metadata: dict) -> Path:
    import transformers
    from loomtest import TINY

    config = transformers.AutoConfig.for_model("llama", **{**TINY["llama"], "intermediate_size": 64})
    write_gguf(folder / "tok.gguf", transformers.LlamaForCausalLM(config), "llama", tokenizer=metadata)
    return folder


@pytest.fixture(scope="module")
def llama3_gguf(assets, tmp_path_factory):
    """(folder with tok.gguf, the tokenizer.json it was made from): Llama 3's tokenizer cut to 6000 tokens, as the
    reference reads the 128k-token file in ~40 s."""
    folder = tmp_path_factory.mktemp("llama3_gguf")
    source = truncated_bpe(assets["llama3"] / "tokenizer.json", 6000, folder.parent / f"{folder.name}.json")
    return _gguf_with_tokenizer(folder, llama3_tokenizer_metadata(source)), source


@pytest.fixture(scope="module")
def spm_gguf(assets, tmp_path_factory):
    return _gguf_with_tokenizer(tmp_path_factory.mktemp("spm_gguf"),
                                sentencepiece_metadata(assets["spm_bpe_llama"] / "tokenizer.model"))


def _reference(folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="tok.gguf")


def test_llama3_ids_equal_the_source_tokenizer_and_the_reference(llama3_gguf):
    from tokenizers import Tokenizer

    folder, source_file = llama3_gguf
    ours, ref = AutoTokenizer.from_pretrained(folder, gguf_file="tok.gguf"), _reference(folder)
    source = Tokenizer.from_file(str(source_file))
    bos = source.token_to_id("<|begin_of_text|>")
    for text in CORPUS:
        ids = ours(text)["input_ids"]
        assert ids == [bos] + source.encode(text).ids, text  # the file says add_bos_token
        # the reference adds GPT-2's <|endoftext|> as a special token the file does not have (an id past the
        # model's vocabulary), so it keeps that text whole where the source tokenizer splits it
        if "<|endoftext|>" not in text:
            assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == source.decode(source.encode(text).ids)
    assert (ours.bos_token, ours.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert len(ours) == source.get_vocab_size()
    assert ours("<|eot_id|>", add_special_tokens=False)["input_ids"] == [source.token_to_id("<|eot_id|>")]


@pytest.mark.parametrize("pre", ["qwen2", "gpt-2"])
def test_other_split_rules_equal_the_reference(llama3_gguf, tmp_path, pre):
    """The same vocabulary under Qwen 2's split rule (digits one by one) and GPT-2's own."""
    _, source_file = llama3_gguf
    _gguf_with_tokenizer(tmp_path, {**llama3_tokenizer_metadata(source_file), "tokenizer.ggml.pre": pre})
    ours, ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf"), _reference(tmp_path)
    for text in CORPUS:
        if "<|endoftext|>" not in text:  # see the test above
            assert ours(text)["input_ids"] == ref(text)["input_ids"], text


def test_full_llama3_vocabulary_ids_equal_its_tokenizer_json(assets, tmp_path):
    """All 128k tokens and 280k merges of the real file (the reference is too slow to read this one in a test)."""
    from tokenizers import Tokenizer

    source_file = assets["llama3"] / "tokenizer.json"
    _gguf_with_tokenizer(tmp_path, llama3_tokenizer_metadata(source_file))
    ours, source = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf"), Tokenizer.from_file(str(source_file))
    assert len(ours) == source.get_vocab_size() == 128256
    for text in CORPUS:
        assert ours(text, add_special_tokens=False)["input_ids"] == source.encode(text).ids, text


def test_sentencepiece_ids_equal_the_llama_tokenizer_and_the_reference(spm_gguf, assets):
    """The source is the reference's LlamaTokenizer over the same tokenizer.model: Llama's recipe, which (like
    llama.cpp) skips the model's NFKC normaliser, so SentencePiece itself differs on combining marks."""
    import transformers

    ours, ref = AutoTokenizer.from_pretrained(spm_gguf, gguf_file="tok.gguf"), _reference(spm_gguf)
    source = transformers.AutoTokenizer.from_pretrained(assets["spm_bpe_llama"])
    for text in CORPUS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"] == source(text)["input_ids"], text
        assert ours.decode(ids) == source.decode(ids)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")


def test_keyword_overrides_and_file_path(llama3_gguf):
    tok = AutoTokenizer.from_pretrained(".", gguf_file=str(llama3_gguf[0] / "tok.gguf"), add_bos_token=False,
                                        padding_side="left")
    assert tok.padding_side == "left" and tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]


def test_unknown_vocabulary_type_and_split_rule_are_named(tmp_path):
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a", "b"]}
    _gguf_with_tokenizer(tmp_path, meta)
    with pytest.raises(ValueError, match=r"tok\.gguf: tokenizer\.ggml\.model='bert'.*`gpt2`.*`llama`"):
        AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "exotic", "tokenizer.ggml.merges": ["a b"]})
    _gguf_with_tokenizer(tmp_path, meta)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='exotic'.*does not know"):
        AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
