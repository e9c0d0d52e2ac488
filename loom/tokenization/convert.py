"""Legacy tokenizer files -> an equivalent `tokenizers.Tokenizer` pipeline.

Three formats: WordPiece `vocab.txt` (BERT family), byte-level BPE `vocab.json` + `merges.txt` (GPT-2 and RoBERTa
families) and SentencePiece `.model` files (Unigram, or BPE with byte fallback). A SentencePiece model converts in
one of three flavours: "generic" follows the model's own normalizer spec, so ids equal
`SentencePieceProcessor.encode`; "llama" is the Llama/Mistral recipe (no normalizer, a dummy prefix on the first
piece only, byte fallback); "t5" is T5's recipe (charsmap only, split on whitespace, sentinel pieces appended);
"xlm-roberta" and "camembert" put fairseq's dictionary (its specials first, <mask> last) over T5-like splitting.
"""
from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram, WordPiece

from .spm_proto import BPE as SPM_BPE
from .spm_proto import CONTROL, NORMAL, USER_DEFINED, SpmModel


def wordpiece_tokenizer(vocab_file: Path, *, unk_token: str = "[UNK]", cls_token: str = "[CLS]",
                        sep_token: str = "[SEP]", do_lower_case: bool = True, strip_accents: bool | None = None,
                        tokenize_chinese_chars: bool = True, clean_text: bool = True) -> Tokenizer:
    """BERT's pipeline over a `vocab.txt` (one token per line, id = line number)."""
    vocab = {}
    with open(vocab_file, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab.setdefault(line.rstrip("\n"), index)
    if unk_token not in vocab:
        raise OSError(f"{vocab_file} has no unknown token {unk_token!r}; set unk_token in tokenizer_config.json")
    tok = Tokenizer(WordPiece(vocab, unk_token=unk_token, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=clean_text, handle_chinese_chars=tokenize_chinese_chars,
                                                strip_accents=strip_accents, lowercase=do_lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [(t, vocab[t]) for t in (cls_token, sep_token) if t in vocab]
    if len(specials) == 2:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep_token}:0", pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
            special_tokens=specials)
    return tok


def byte_level_bpe_tokenizer(vocab_file: Path, merges_file: Path, *, add_prefix_space: bool = False) -> Tokenizer:
    """GPT-2's byte-level BPE over `vocab.json` + `merges.txt`; adds no special tokens around sequences."""
    # the constructor reads the files inside the Rust builder; BPE.from_file reads them into a (vocab, merges)
    # pair first and hands it to the builder, which measured 5-15% slower on GPT-2's 50k merges
    model = BPE(vocab=str(vocab_file), merges=str(merges_file), continuing_subword_prefix="", end_of_word_suffix="",
                fuse_unk=False, dropout=None)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = special_tokens_processor(None, None)
    return tok


def _family_token_id(engine: Tokenizer, family: str, name: str, token) -> int:
    index = None if token is None else engine.token_to_id(str(token))
    if index is None:
        raise ValueError(f"{family} puts {name} around every sequence, but {name}={token!r} is not a token of this "
                         f"vocabulary; leave {name} at its default or set it to a token the vocabulary has")
    return index


def roberta_processor(engine: Tokenizer, cls_token, sep_token, *, trim_offsets: bool = True,
                      add_prefix_space: bool = False):
    """RoBERTa's `<s> A </s>` / `<s> A </s></s> B </s>` post-processor over the engine's ids for the two tokens."""
    cls_id = _family_token_id(engine, "RoBERTa", "cls_token", cls_token)
    sep_id = _family_token_id(engine, "RoBERTa", "sep_token", sep_token)
    return processors.RobertaProcessing((str(sep_token), sep_id), (str(cls_token), cls_id),
                                        trim_offsets=trim_offsets, add_prefix_space=add_prefix_space)


def t5_processor(engine: Tokenizer, eos_token):
    """T5's `A </s>` / `A </s> B </s>` post-processor; every token of a pair has type id 0, as in the reference."""
    eos_id = _family_token_id(engine, "T5", "eos_token", eos_token)
    eos = str(eos_token)
    return processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:0 {eos}:0",
                                         special_tokens=[(eos, eos_id)])


def bert_processor(engine: Tokenizer, family: str, cls_token, sep_token):
    """BERT's `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` post-processor (the second sequence has type id 1)."""
    cls, sep = str(cls_token), str(sep_token)
    cls_id = _family_token_id(engine, family, "cls_token", cls_token)
    sep_id = _family_token_id(engine, family, "sep_token", sep_token)
    return processors.TemplateProcessing(single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                                         special_tokens=[(cls, cls_id), (sep, sep_id)])


def deberta_v2_tokenizer(model: SpmModel, *, do_lower_case: bool = False, split_by_punct: bool = False,
                         add_prefix_space: bool = True) -> Tokenizer:
    """DeBERTa-v2/v3's `spm.model` as the reference converts it: its Unigram pieces with the model's charsmap, but
    DeBERTa's own whitespace handling (trailing spaces dropped, runs of spaces squeezed) instead of the model's."""
    tok = Tokenizer(Unigram([(p.piece, p.score) for p in model.pieces], unk_id=model.unk_id, byte_fallback=False))
    steps = [normalizers.Lowercase()] if do_lower_case else []
    if model.precompiled_charsmap:
        steps += [normalizers.Precompiled(model.precompiled_charsmap), normalizers.Strip(left=False, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    else:
        steps += [normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "), normalizers.NFC(),
                  normalizers.Strip(left=False, right=True)]
    tok.normalizer = normalizers.Sequence(steps)
    scheme = "always" if add_prefix_space else "first"
    splitters = [pre_tokenizers.Punctuation(behavior="isolated")] if split_by_punct else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(splitters + [pre_tokenizers.Metaspace(replacement="▁",
                                                                                      prepend_scheme=scheme)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    return tok


def special_tokens_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    """A TemplateProcessing that puts `bos` before and `eos` after each sequence (either may be None)."""
    head = f"{bos[0]}:0 " if bos else ""
    tail = f" {eos[0]}:0" if eos else ""
    single = f"{head}$A:0{tail}"
    pair = f"{single} {head.replace(':0', ':1')}$B:1{tail.replace(':0', ':1')}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t])


def _generic_merges(model: SpmModel) -> list[tuple[str, str]]:
    # A BPE piece's score is minus its merge rank, so merges are ranked by the score of the piece they build;
    # only normal pieces take part, as in SentencePiece itself
    normal = {p.piece: (p.score, i) for i, p in enumerate(model.pieces) if p.type == NORMAL}
    ranked = []
    for token, (score, index) in normal.items():
        for split in range(1, len(token)):
            left, right = token[:split], token[split:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _llama_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    # Llama's recipe ranks merges by the id of the piece they build, then by the lengths of the two halves
    merges = []
    for token, index in vocab.items():
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, index) for left, right in local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def fairseq_processor(engine: Tokenizer, bos_token, eos_token):
    """XLM-R's and CamemBERT's `<s> A </s>` / `<s> A </s> </s> B </s>` (token types all 0)."""
    bos = (str(bos_token), _family_token_id(engine, "XLM-RoBERTa", "bos_token", bos_token))
    eos = (str(eos_token), _family_token_id(engine, "XLM-RoBERTa", "eos_token", eos_token))
    return processors.TemplateProcessing(single=f"{bos[0]} $A {eos[0]}",
                                         pair=f"{bos[0]} $A {eos[0]} {eos[0]} $B {eos[0]}", special_tokens=[bos, eos])


# fairseq's dictionary over a SentencePiece model: its own specials first, then the model's pieces from this index
# (shifted), then <mask>. CamemBERT keeps the model's <s>, </s> as pieces and parks unused names in front.
_FAIRSEQ_HEADS = {"xlm-roberta": ([("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)], 3),
                  "camembert": ([("<s>NOTUSED", 0.0), ("<pad>", 0.0), ("</s>NOTUSED", 0.0), ("<unk>", 0.0),
                                 ("<unk>NOTUSED", -100.0)], 1)}


def _fairseq_tokenizer(model: SpmModel, flavour: str) -> Tokenizer:
    head, first_piece = _FAIRSEQ_HEADS[flavour]
    pieces = head + [(p.piece, p.score) for p in model.pieces[first_piece:]] + [("<mask>", 0.0)]
    tok = Tokenizer(Unigram(pieces, unk_id=3, byte_fallback=False))
    if model.precompiled_charsmap:
        tok.normalizer = normalizers.Precompiled(model.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


def sentencepiece_tokenizer(model: SpmModel, flavour: str = "generic", extra_ids: int = 0) -> Tokenizer:
    """Convert a parsed SentencePiece model; `flavour` is "generic" (the model's own spec), "llama" or "t5"
    (`extra_ids` sentinel pieces `<extra_id_N>` are appended to T5's vocabulary, highest N first)."""
    if flavour == "llama":
        return _llama_tokenizer(model)
    if flavour == "t5":
        return _t5_tokenizer(model, extra_ids)
    if flavour in _FAIRSEQ_HEADS:
        return _fairseq_tokenizer(model, flavour)
    user_defined = [p.piece for p in model.pieces if p.type == USER_DEFINED]
    if model.model_type == SPM_BPE:
        vocab = {p.piece: i for i, p in enumerate(model.pieces)}
        tok = Tokenizer(BPE(vocab=vocab, merges=_generic_merges(model), unk_token=model.unk_piece, fuse_unk=True,
                            byte_fallback=model.byte_fallback, dropout=None, ignore_merges=bool(user_defined)))
    else:
        tok = Tokenizer(Unigram([(p.piece, p.score) for p in model.pieces], unk_id=model.unk_id,
                                byte_fallback=model.byte_fallback))
    # SentencePiece's normalisation order: charsmap, whitespace squeeze, escape spaces, dummy prefix
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        # only spaces: SentencePiece keeps newlines and tabs as they are
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if model.add_dummy_prefix:
        # Metaspace does not prefix a text that already starts with "▁"; SentencePiece does
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tok.normalizer = normalizers.Sequence(steps)
    splitters = []
    if model.add_dummy_prefix:
        splitters.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False))
    if user_defined:
        # SentencePiece emits user-defined pieces whole and never merges across them
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        splitters.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if splitters:
        tok.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    steps = [decoders.Replace("▁", " ")]
    if model.byte_fallback:
        steps.append(decoders.ByteFallback())
    if model.add_dummy_prefix:
        # Strip works per token: fuse first so that only the start of the text loses its space
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif model.byte_fallback:
        steps.append(decoders.Fuse())
    tok.decoder = decoders.Sequence(steps)
    tok.post_processor = special_tokens_processor(None, None)
    return tok


def _llama_tokenizer(model: SpmModel) -> Tokenizer:
    vocab = {}
    for i, p in enumerate(model.pieces):
        vocab.setdefault(p.piece, i)
    return llama_bpe_tokenizer(vocab, _llama_merges(vocab))


def llama_bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """Llama's SentencePiece BPE recipe over a vocabulary and its merges (byte fallback, "▁" for spaces, a prefix
    space on the first piece only)."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.post_processor = special_tokens_processor(None, None)
    return tok


def _t5_tokenizer(model: SpmModel, extra_ids: int) -> Tokenizer:
    # T5 ignores the model's whitespace options: words are split on any whitespace, each gets a "▁" prefix
    pieces = [(p.piece, p.score) for p in model.pieces]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    tok = Tokenizer(Unigram(pieces, unk_id=model.unk_id, byte_fallback=False))
    if model.precompiled_charsmap:
        tok.normalizer = normalizers.Precompiled(model.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = special_tokens_processor(None, None)
    return tok


def spm_special_tokens(model: SpmModel) -> tuple[dict[str, str], list[str]]:
    """Named special tokens (bos/eos/unk) of a SentencePiece model, and its other control pieces."""
    named = {}
    for name in ("bos", "eos", "unk"):
        if getattr(model, f"{name}_id") >= 0:
            named[f"{name}_token"] = getattr(model, f"{name}_piece")
    controls = [p.piece for p in model.pieces if p.type == CONTROL]
    return named, controls
