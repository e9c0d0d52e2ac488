"""Checking a tokenizer call's arguments: the text inputs and the padding/truncation strategies.

Every bad input ends here in a TypeError/ValueError that names the argument, before the engine sees it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

LARGE_INTEGER = int(1e20)
VERY_LARGE_INTEGER = int(1e30)  # the reference's "no limit known" sentinel for model_max_length

_PADDING = {"longest": "longest", "max_length": "max_length", "do_not_pad": None}
_TRUNCATION = {"longest_first": "longest_first", "only_first": "only_first", "only_second": "only_second",
               "do_not_truncate": None}


@dataclass
class Strategy:
    padding: str | None  # "longest", "max_length" or None
    truncation: str | None  # "longest_first", "only_first", "only_second" or None
    max_length: int | None


def _padding_name(padding) -> str | None:
    padding = getattr(padding, "value", padding)
    if padding is True:
        return "longest"
    if padding is False or padding is None:
        return None
    if isinstance(padding, str) and padding in _PADDING:
        return _PADDING[padding]
    raise ValueError(f"padding={padding!r} is not a padding strategy; use True/'longest', 'max_length' or False")


def _truncation_name(truncation) -> str | None:
    truncation = getattr(truncation, "value", truncation)
    if truncation is True:
        return "longest_first"
    if truncation is False or truncation is None:
        return None
    if isinstance(truncation, str) and truncation in _TRUNCATION:
        return _TRUNCATION[truncation]
    raise ValueError(f"truncation={truncation!r} is not a truncation strategy; use True/'longest_first', "
                     "'only_first', 'only_second' or False")


def _check_int(name: str, value, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def resolve_strategy(tok, padding, truncation, max_length, pad_to_multiple_of, stride: int = 0) -> Strategy:
    """Turn padding/truncation/max_length arguments into one Strategy, checking them against the tokenizer."""
    _check_int("max_length", max_length, 0)
    _check_int("pad_to_multiple_of", pad_to_multiple_of, 1)
    _check_int("stride", stride, 0)
    # as in the reference: max_length alone (no padding, truncation left unset) means truncate to it
    if max_length is not None and padding is False and truncation is None:
        truncation = "longest_first"
    pad, trunc = _padding_name(padding), _truncation_name(truncation)
    if max_length is None and (pad == "max_length" or trunc is not None):
        if tok.model_max_length >= LARGE_INTEGER:
            wanted = "padding='max_length'" if pad == "max_length" else f"truncation={truncation!r}"
            raise ValueError(f"{wanted} needs a length, but max_length was not given and this tokenizer's "
                             "model_max_length is unknown (no model_max_length in tokenizer_config.json and no "
                             "max_position_embeddings in config.json); pass max_length=... or set "
                             "tok.model_max_length")
        max_length = tok.model_max_length
    if pad is not None and tok.pad_token_id is None:
        raise ValueError("padding was requested but the tokenizer has no pad token; set one, e.g. "
                         "`tok.pad_token = tok.eos_token`, or add one with "
                         "`tok.add_special_tokens({'pad_token': '[PAD]'})`")
    if (trunc is not None and pad is not None and pad_to_multiple_of is not None and max_length is not None
            and max_length % pad_to_multiple_of):
        raise ValueError(f"truncation and padding are both on, but max_length={max_length} is not a multiple of "
                         f"pad_to_multiple_of={pad_to_multiple_of}; make max_length a multiple of it")
    return Strategy(pad, trunc, max_length)


def _is_words(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value)


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (list, tuple)) else type(value).__name__


def batch_inputs(text, text_pair=None, is_split_into_words: bool = False, name: str = "text") -> tuple[list, bool]:
    """Inputs for `Tokenizer.encode_batch` and whether the call was batched; TypeError/ValueError for bad input."""
    pair_name = name.replace("text", "text_pair") if name != "text" else "text_pair"
    if is_split_into_words:
        if _is_words(text):
            if text_pair is not None and not _is_words(text_pair):
                raise TypeError(f"{pair_name} must be a list of words (str) like {name}, got {_describe(text_pair)}")
            return [(list(text), list(text_pair)) if text_pair is not None else list(text)], False
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"with is_split_into_words=True, {name} must be a list of words or a batch (list) of "
                            f"lists of words, got {_describe(text)}")
        for i, words in enumerate(text):
            if not _is_words(words):
                raise TypeError(f"with is_split_into_words=True, {name}[{i}] must be a list of words (str), got "
                                f"{_describe(words)}; nested deeper lists are not supported")
        if text_pair is None:
            return [list(w) for w in text], True
        _check_pair_batch(text, text_pair, pair_name, _is_words, "a list of words (str)")
        return [(list(a), list(b)) for a, b in zip(text, text_pair)], True

    if isinstance(text, str):
        if text_pair is not None and not isinstance(text_pair, str):
            raise TypeError(f"{pair_name} must be a str when {name} is a str, got {_describe(text_pair)}")
        # an empty second text counts as none, as in the reference
        return [(text, text_pair) if text_pair else text], False
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"{name} must be a str, a list of str (a batch), or a list of (str, str) pairs; "
                        f"got {_describe(text)}")
    if text_pair is not None:
        for i, item in enumerate(text):
            if not isinstance(item, str):
                raise TypeError(f"{name}[{i}] must be a str, got {_describe(item)}")
        _check_pair_batch(text, text_pair, pair_name, lambda x: isinstance(x, str), "a str")
        return list(zip(text, text_pair)), True
    out = []
    for i, item in enumerate(text):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item):
            out.append((item[0], item[1]))  # a batch of (text, text_pair) pairs
        else:
            hint = (" (lists of words need is_split_into_words=True)" if _is_words(item) else "")
            raise TypeError(f"{name}[{i}] must be a str or a (str, str) pair, got {_describe(item)}{hint}")
    return out, True


def _check_pair_batch(text, text_pair, pair_name: str, ok, what: str) -> None:
    if isinstance(text_pair, str) or not isinstance(text_pair, (list, tuple)):
        raise TypeError(f"{pair_name} must be a list with one entry per item of the batch, got "
                        f"{_describe(text_pair)}")
    if len(text_pair) != len(text):
        raise ValueError(f"{pair_name} has {len(text_pair)} entries but the batch has {len(text)}; pass one "
                         "second sequence per first sequence")
    for i, item in enumerate(text_pair):
        if not ok(item):
            raise TypeError(f"{pair_name}[{i}] must be {what}, got {_describe(item)}")


class PaddingStrategy(str, Enum):
    """The reference's names for `padding=` values (a plain string works everywhere too)."""

    LONGEST = "longest"
    MAX_LENGTH = "max_length"
    DO_NOT_PAD = "do_not_pad"


class TruncationStrategy(str, Enum):
    """The reference's names for `truncation=` values."""

    ONLY_FIRST = "only_first"
    ONLY_SECOND = "only_second"
    LONGEST_FIRST = "longest_first"
    DO_NOT_TRUNCATE = "do_not_truncate"


class TensorType(str, Enum):
    """`return_tensors=` values loom supports: PyTorch tensors and NumPy arrays."""

    PYTORCH = "pt"
    NUMPY = "np"
