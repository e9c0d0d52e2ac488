"""The encode hot path: one batch call on the Rust engine, then padding and tensors built in numpy.

The engine truncates but does not pad: padding in numpy from the unpadded ids means fewer Python ints to create,
and the attention mask comes from the lengths alone. Unless offsets or overflowing tokens are requested, the
engine runs without computing offsets (`encode_batch_fast`: same ids, types, masks and words). The engine's
Encodings are built with offsets and padded only if someone asks for them (BatchEncoding.encodings, word_ids,
char_to_token, ...), so callers that just want tensors pay for neither; those who do pay a second engine pass.
"""
from __future__ import annotations

import json
from itertools import chain

import numpy as np

from .arguments import Strategy
from .batch_encoding import BatchEncoding


def configure_engine(tok, strategy: Strategy, stride: int, split_special_tokens: bool) -> None:
    """Set truncation on the engine (only when it changed: the setters are not free) and switch its padding off."""
    engine = tok._tokenizer
    wanted = None
    if strategy.truncation is not None:
        wanted = (strategy.max_length, stride, strategy.truncation, tok.truncation_side)
    if wanted != tok._engine_truncation or engine.truncation is not None and wanted is None:
        if wanted is None:
            engine.no_truncation()
        else:
            engine.enable_truncation(max_length=wanted[0], stride=wanted[1], strategy=wanted[2],
                                     direction=wanted[3])
        tok._engine_truncation = wanted
    if engine.padding is not None:
        engine.no_padding()
    if engine.encode_special_tokens != split_special_tokens:
        engine.encode_special_tokens = split_special_tokens


def run_engine(tok, inputs: list, add_special_tokens: bool, is_pretokenized: bool, strategy: Strategy,
               offsets: bool = True) -> list:
    encode = tok._tokenizer.encode_batch if offsets else tok._tokenizer.encode_batch_fast
    try:
        return encode(inputs, add_special_tokens=add_special_tokens, is_pretokenized=is_pretokenized)
    except Exception as e:  # the engine raises plain Exceptions with terse messages
        message = str(e)
        if "runcat" in message:
            raise ValueError(f"cannot truncate to max_length={strategy.max_length} with "
                             f"truncation={strategy.truncation!r}: {message}. Use a larger max_length or another "
                             "truncation strategy") from None
        raise ValueError(f"the tokenizer could not encode the input: {message}") from None


def single_type_ids_are_zero(engine) -> bool:
    """True when a single sequence always gets token_type_ids of 0, so they need not be read token by token."""
    processor = engine.post_processor
    if processor is None:
        return True
    return _zero_types(json.loads(processor.__getstate__()))


def _zero_types(state: dict) -> bool:
    kind = state.get("type")
    if kind in ("BertProcessing", "RobertaProcessing", "ByteLevel"):
        return True
    if kind == "TemplateProcessing":
        return all(piece["type_id"] == 0 for item in state["single"] for piece in item.values())
    if kind == "Sequence":
        return all(_zero_types(p) for p in state["processors"])
    return False


def target_length(lengths: list[int], strategy: Strategy, pad_to_multiple_of: int | None) -> int | None:
    if strategy.padding is None:
        return None
    length = max(lengths, default=0) if strategy.padding == "longest" else strategy.max_length
    if pad_to_multiple_of and length % pad_to_multiple_of:
        length += pad_to_multiple_of - length % pad_to_multiple_of
    return length


def _pad_lists(rows: list[list], length: int, value, left: bool) -> list[list]:
    if left:
        return [[value] * (length - len(r)) + r if len(r) < length else r for r in rows]
    return [r + [value] * (length - len(r)) if len(r) < length else r for r in rows]


def _pad_numpy(rows: list, lengths: np.ndarray, length: int, value, left: bool, mask: np.ndarray, width=None):
    shape = (len(rows), length) if width is None else (len(rows), length, width)
    out = np.full(shape, value, dtype=np.int64)
    total = int(lengths.sum())
    if width is None:
        out[mask] = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total)
    elif total:
        out[mask] = np.array(list(chain.from_iterable(rows)), dtype=np.int64).reshape(total, width)
    return out


def build_features(tok, encodings: list, *, want_types: bool, types_are_zero: bool, want_mask: bool,
                   want_special: bool, want_offsets: bool, want_length: bool, length: int | None,
                   padding_side: str, tensor_type: str | None) -> dict:
    """Model inputs from (unpadded) engine encodings, padded to `length` (None: no padding)."""
    left = padding_side == "left"
    ids = [e.ids for e in encodings]
    lengths = [len(r) for r in ids]
    pad_id, pad_type = tok.pad_token_id, tok.pad_token_type_id
    rectangular = length is not None and all(n <= length for n in lengths)
    if length is None and tensor_type is not None and len(set(lengths)) <= 1:
        length, rectangular = (lengths[0] if lengths else 0), True  # nothing to pad, but numpy still builds faster
    features = {}
    if tensor_type is not None and rectangular:
        n = np.fromiter(lengths, dtype=np.int64, count=len(lengths))
        positions = np.arange(length)[None, :]
        mask = positions >= (length - n)[:, None] if left else positions < n[:, None]
        features["input_ids"] = _pad_numpy(ids, n, length, pad_id or 0, left, mask)
        if want_types:
            if types_are_zero and pad_type == 0:
                features["token_type_ids"] = np.zeros((len(ids), length), dtype=np.int64)
            else:
                features["token_type_ids"] = _pad_numpy([e.type_ids for e in encodings], n, length, pad_type,
                                                        left, mask)
        if want_mask:
            features["attention_mask"] = mask.astype(np.int64)
        if want_special:
            features["special_tokens_mask"] = _pad_numpy([e.special_tokens_mask for e in encodings], n, length, 1,
                                                          left, mask)
        if want_offsets:
            features["offset_mapping"] = _pad_numpy([e.offsets for e in encodings], n, length, 0, left, mask,
                                                    width=2)
        if want_length:
            features["length"] = np.full((len(ids),), length, dtype=np.int64)
        return features

    pad = (lambda rows, value: _pad_lists(rows, length, value, left)) if length is not None else (lambda r, v: r)
    features["input_ids"] = pad(ids, pad_id)
    if want_types:
        features["token_type_ids"] = pad([e.type_ids for e in encodings], pad_type)
    if want_mask:
        features["attention_mask"] = pad([[1] * n for n in lengths], 0)
    if want_special:
        features["special_tokens_mask"] = pad([e.special_tokens_mask for e in encodings], 1)
    if want_offsets:
        features["offset_mapping"] = pad([e.offsets for e in encodings], (0, 0))
    if want_length:
        features["length"] = [len(r) for r in features["input_ids"]]
    return features


def flatten_overflow(encodings: list) -> tuple[list, list[int]]:
    """Each encoding followed by its overflowing pieces, and the index of the input each row came from."""
    rows, mapping = [], []
    for i, e in enumerate(encodings):
        for piece in (e, *e.overflowing):
            rows.append(piece)
            mapping.append(i)
    return rows, mapping


def encodings_source(tok, rows: list, length: int | None, padding_side: str, rebuild=None):
    """The engine encodings for BatchEncoding, or a callable that makes them on first use: `rebuild()` re-encodes
    rows that were encoded without offsets, then they are padded the way the features were."""
    if rebuild is None and (length is None or all(len(e) >= length for e in rows)):
        return rows
    pad_id, pad_type, pad_token = tok.pad_token_id, tok.pad_token_type_id, tok.pad_token

    def build():
        encodings = rebuild() if rebuild is not None else rows
        if length is not None:
            for e in encodings:
                if len(e) < length:
                    e.pad(length, direction=padding_side, pad_id=pad_id, pad_type_id=pad_type, pad_token=pad_token)
        return encodings

    return build


def encode_inputs(tok, inputs: list, is_batched: bool, strategy: Strategy, *, add_special_tokens: bool,
                  stride: int, is_split_into_words: bool, pad_to_multiple_of: int | None, padding_side: str | None,
                  return_tensors: str | None, return_token_type_ids: bool | None,
                  return_attention_mask: bool | None, return_overflowing_tokens: bool,
                  return_special_tokens_mask: bool, return_offsets_mapping: bool, return_length: bool,
                  split_special_tokens: bool) -> BatchEncoding:
    def encode(offsets: bool) -> tuple[list, list[int] | None]:
        configure_engine(tok, strategy, stride, split_special_tokens)  # again: another call may have changed it
        rows = run_engine(tok, inputs, add_special_tokens, is_split_into_words, strategy, offsets) if inputs else []
        return flatten_overflow(rows) if return_overflowing_tokens else (rows, None)

    # the offsets-free pass gives overflowing pair pieces wrong type ids (tokenizers 0.23): overflow takes the full one
    full = return_offsets_mapping or return_overflowing_tokens
    encodings, mapping = encode(offsets=full)
    side = padding_side or tok.padding_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    names = tok.model_input_names
    want_types = "token_type_ids" in names if return_token_type_ids is None else return_token_type_ids
    want_mask = "attention_mask" in names if return_attention_mask is None else return_attention_mask
    has_pairs = any(isinstance(x, tuple) for x in inputs)
    types_zero = want_types and not has_pairs and single_type_ids_are_zero(tok._tokenizer)
    length = target_length([len(e) for e in encodings], strategy, pad_to_multiple_of)
    features = build_features(tok, encodings, want_types=want_types, types_are_zero=types_zero, want_mask=want_mask,
                              want_special=return_special_tokens_mask, want_offsets=return_offsets_mapping,
                              want_length=return_length, length=length, padding_side=side,
                              tensor_type=return_tensors)
    if mapping is not None:
        features["overflow_to_sample_mapping"] = mapping
    rebuild = None if full or not inputs else (lambda: encode(offsets=True)[0])
    source = encodings_source(tok, encodings, length, side, rebuild)
    if not is_batched and return_tensors is None and not return_overflowing_tokens:
        features = {k: v[0] if isinstance(v, list) and v and isinstance(v[0], list) else v
                    for k, v in features.items()}
    return BatchEncoding(features, source, tensor_type=return_tensors)
