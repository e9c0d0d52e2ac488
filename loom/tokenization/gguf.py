"""A tokenizer from a GGUF file's `tokenizer.ggml.*` metadata (llama.cpp keeps no tokenizer.json).

Two vocabularies: `gpt2` (byte-level BPE: tokens, merges, and a `pre` name for the text-splitting regex its merges
were learned with) and `llama` (SentencePiece BPE with byte fallback: tokens and scores, merges implied by the
scores). Tokens typed CONTROL become special tokens, USER_DEFINED ones plain added tokens; bos/eos/unk/pad come from
their ids, add_bos_token/add_eos_token and the chat template from the metadata.
"""
from __future__ import annotations

import functools
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from . import convert

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's `tokenizer.ggml.pre` -> the split regex; None: GPT-2's own (ByteLevel's built-in regex)
PRE_SPLITS = {"default": None, "gpt-2": None, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
              "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
              "deepseek-r1-qwen": _QWEN2_SPLIT}
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes that print as themselves keep their character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_engine(meta: dict, file) -> Tokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # a token written with characters outside the byte alphabet (a llama.cpp export of an added token) is respelled
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
              for t in meta["tokenizer.ggml.tokens"]]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise ValueError(f"{file}: tokenizer.ggml.pre={pre!r} names a text-splitting rule loom does not know (it "
                         f"knows {', '.join(sorted(PRE_SPLITS))}); without it the ids would differ from llama.cpp's. "
                         "Load the model's tokenizer.json instead (AutoTokenizer.from_pretrained on the original "
                         "repository)")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    engine = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False, dropout=None))
    if PRE_SPLITS[pre] is None:
        engine.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        engine.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    engine.decoder = decoders.ByteLevel()
    return engine


def scored_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges from the piece scores: every split of a piece into two pieces, best score first
    (then the longer left half), as the reference derives them for a GGUF vocabulary."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores):
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((left, right, score) for left, right in splits)
    ranked.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))
    return [(left, right) for left, right, _ in ranked]


def _sentencepiece_engine(meta: dict, file) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError(f"{file}: a `llama` (SentencePiece) vocabulary needs tokenizer.ggml.scores to rank its "
                         "merges, and this file has none; re-export it with llama.cpp's converter")
    return convert.llama_bpe_tokenizer({t: i for i, t in enumerate(tokens)}, scored_merges(tokens, scores))


_ENGINES = {"gpt2": _byte_level_engine, "llama": _sentencepiece_engine}


def _add_typed_tokens(engine: Tokenizer, meta: dict) -> None:
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    alphabet = set(_byte_alphabet().values()) if meta.get("tokenizer.ggml.model") == "gpt2" else None
    # a control token spelled outside the byte alphabet is a llama.cpp mislabel: adding it would grow the vocabulary
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
               if kind == CONTROL and (alphabet is None or set(t) <= alphabet)]
    engine.add_special_tokens(control)
    vocab = engine.get_vocab()
    engine.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
                       if kind == USER_DEFINED and t in vocab])


def gguf_tokenizer(file, **settings) -> tuple[Tokenizer, dict]:
    """(engine, tokenizer keyword arguments) for the GGUF file `file`; `settings` override the file's."""
    from loom.gguf.reader import open_gguf

    meta = open_gguf(file).fields
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _ENGINES or "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{file}: tokenizer.ggml.model={kind!r}; loom builds tokenizers from GGUF `gpt2` (byte-level "
                         "BPE) and `llama` (SentencePiece BPE) vocabularies only. Load the model's tokenizer.json "
                         "instead")
    engine = _ENGINES[kind](meta, file)
    _add_typed_tokens(engine, meta)
    tokens = meta["tokenizer.ggml.tokens"]
    init = {name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in _SPECIAL_IDS.items()
            if f"tokenizer.ggml.{key}" in meta}
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    init["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    init["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if "tokenizer.chat_template" in meta:
        init["chat_template"] = meta["tokenizer.chat_template"]
    return engine, {**init, **settings, "name_or_path": str(file)}


def load_gguf_tokenizer(path_or_id: str | os.PathLike, gguf_file, **kwargs) -> tuple[Tokenizer, dict]:
    """`from_pretrained(path_or_id, gguf_file=...)`: hub keywords find the file, other keywords override."""
    from loom.gguf.reader import find_gguf
    from loom.hub import pop_hub_kwargs

    from .loading import IGNORED_KWARGS, _special_settings

    file = find_gguf(path_or_id, gguf_file, **pop_hub_kwargs(kwargs))
    for key in IGNORED_KWARGS:
        kwargs.pop(key, None)
    return gguf_tokenizer(file, **_special_settings(kwargs))
