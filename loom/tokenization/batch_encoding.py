"""BatchEncoding: the dict a tokenizer returns (input_ids, attention_mask, ...) plus the engine's Encodings.

It is a `UserDict` with attribute access, `.to(device)`, tensor conversion and the alignment helpers
(`word_ids`, `sequence_ids`, `token_to_chars`, `char_to_token`, ...) that read the `tokenizers` Encodings.
Encodings may be produced lazily (the tokenizer pads them only when someone asks), so they sit behind a property.
"""
from __future__ import annotations

from collections import UserDict
from typing import Any, Callable, NamedTuple

import numpy as np

TENSOR_TYPES = ("pt", "np")


class CharSpan(NamedTuple):
    """A span of characters in the original text: [start, end)."""
    start: int
    end: int


class TokenSpan(NamedTuple):
    """A span of tokens in an encoded sequence: [start, end)."""
    start: int
    end: int


def check_tensor_type(tensor_type) -> str | None:
    """Normalise `return_tensors` ("pt", "np", an enum with .value, or None) or raise a ValueError naming it."""
    if tensor_type is None:
        return None
    value = getattr(tensor_type, "value", tensor_type)
    if value not in TENSOR_TYPES:
        raise ValueError(f"return_tensors={tensor_type!r} is not supported; use 'pt' (torch.Tensor), "
                         "'np' (numpy.ndarray) or None (Python lists)")
    return value


def _as_numpy(key: str, value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        if isinstance(value, (list, tuple)) and len(value) == 0:
            return np.zeros((0,), dtype=np.int64)
        array = np.asarray(value)
        if array.dtype == object:
            raise ValueError("ragged")
        return array.astype(np.int64) if array.dtype.kind in "iub" else array
    except ValueError:
        raise ValueError(f"cannot make a tensor of '{key}': its sequences have different lengths; pass "
                         "padding=True (and truncation=True) so that every sequence in the batch has one length")


def _to_tensor(key: str, value, tensor_type: str):
    if tensor_type == "np":
        return _as_numpy(key, value)
    import torch

    if torch.is_tensor(value):
        return value
    return torch.from_numpy(np.ascontiguousarray(_as_numpy(key, value)))


class BatchEncoding(UserDict):
    """Output of a tokenizer call: a dict of model inputs with attribute access and token/char alignment helpers."""

    def __init__(self, data: dict[str, Any] | None = None, encoding=None, tensor_type: str | None = None,
                 prepend_batch_axis: bool = False, n_sequences: int | None = None):
        super().__init__(data)
        if encoding is not None and not isinstance(encoding, (list, tuple)) and not callable(encoding):
            encoding = [encoding]
        # a callable builds the encodings on first use (padding them is work most callers never need)
        self._encodings_source: list | Callable[[], list] | None = encoding
        self._n_sequences = n_sequences
        self.convert_to_tensors(tensor_type, prepend_batch_axis=prepend_batch_axis)

    # dict and attribute access
    def __getitem__(self, item):
        if isinstance(item, str):
            return self.data[item]
        if isinstance(item, int) and self.encodings is not None:
            return self.encodings[item]
        if isinstance(item, slice):
            return {key: value[item] for key, value in self.data.items()}
        raise KeyError(f"BatchEncoding keys are strings ({list(self.data)}), integers (the i-th Encoding) or "
                       f"slices; got {item!r}")

    def __getattr__(self, item: str):
        if item.startswith("__") or item in ("data", "_encodings_source", "_n_sequences"):
            raise AttributeError(item)
        try:
            return self.data[item]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key or attribute '{item}' (keys: {list(self.data)})") from None

    def __getstate__(self):
        return {"data": self.data, "encodings": self.encodings, "n_sequences": self._n_sequences}

    def __setstate__(self, state):
        self.data = state["data"]
        self._encodings_source = state.get("encodings")
        self._n_sequences = state.get("n_sequences")

    # engine encodings
    @property
    def encodings(self) -> list | None:
        """The `tokenizers.Encoding` of each sequence in the batch (None when built from plain lists)."""
        if callable(self._encodings_source):
            self._encodings_source = self._encodings_source()
        return self._encodings_source

    @property
    def is_fast(self) -> bool:
        return self._encodings_source is not None

    @property
    def n_sequences(self) -> int | None:
        if self._n_sequences is None and self.encodings:
            self._n_sequences = self.encodings[0].n_sequences
        return self._n_sequences

    def _encoding(self, batch_index: int):
        if self.encodings is None:
            raise ValueError("this BatchEncoding has no token/char alignment: it was not produced by a tokenizer "
                             "call (for example it came from tok.pad(...))")
        return self.encodings[batch_index]

    def _split(self, batch_or_index: int, index: int | None) -> tuple[int, int]:
        if index is None:
            if self.encodings is not None and len(self.encodings) > 1:
                raise ValueError("this batch holds several sequences: pass (batch_index, index)")
            return 0, batch_or_index
        return batch_or_index, index

    def tokens(self, batch_index: int = 0) -> list[str]:
        """Token strings of sequence `batch_index`."""
        return self._encoding(batch_index).tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token, the index of the word it came from (None for special and padding tokens)."""
        return self._encoding(batch_index).word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token, 0 or 1 for the first or second sequence of a pair (None for special tokens)."""
        return self._encoding(batch_index).sequence_ids

    def token_to_sequence(self, batch_or_token_index: int, token_index: int | None = None) -> int:
        batch_index, token_index = self._split(batch_or_token_index, token_index)
        if token_index < 0:
            token_index += len(self._encoding(batch_index))
        return self._encoding(batch_index).token_to_sequence(token_index)

    def token_to_word(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        batch_index, token_index = self._split(batch_or_token_index, token_index)
        if token_index < 0:
            token_index += len(self._encoding(batch_index))
        return self._encoding(batch_index).token_to_word(token_index)

    def word_to_tokens(self, batch_or_word_index: int, word_index: int | None = None,
                       sequence_index: int = 0) -> TokenSpan | None:
        batch_index, word_index = self._split(batch_or_word_index, word_index)
        span = self._encoding(batch_index).word_to_tokens(word_index, sequence_index)
        return TokenSpan(*span) if span is not None else None

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> CharSpan | None:
        """Character span in the original text of a token (None for special and padding tokens)."""
        batch_index, token_index = self._split(batch_or_token_index, token_index)
        span = self._encoding(batch_index).token_to_chars(token_index)
        return CharSpan(*span) if span is not None else None

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None,
                      sequence_index: int = 0) -> int | None:
        """Index of the token that covers character `char_index` of the text (None if no token does)."""
        batch_index, char_index = self._split(batch_or_char_index, char_index)
        return self._encoding(batch_index).char_to_token(char_index, sequence_index)

    def word_to_chars(self, batch_or_word_index: int, word_index: int | None = None,
                      sequence_index: int = 0) -> CharSpan | None:
        batch_index, word_index = self._split(batch_or_word_index, word_index)
        span = self._encoding(batch_index).word_to_chars(word_index, sequence_index)
        return CharSpan(*span) if span is not None else None

    def char_to_word(self, batch_or_char_index: int, char_index: int | None = None,
                     sequence_index: int = 0) -> int | None:
        batch_index, char_index = self._split(batch_or_char_index, char_index)
        return self._encoding(batch_index).char_to_word(char_index, sequence_index)

    # tensors and devices
    def convert_to_tensors(self, tensor_type: str | None = None, prepend_batch_axis: bool = False) -> "BatchEncoding":
        """Turn every value into a torch.Tensor ("pt") or numpy array ("np"), in place."""
        tensor_type = check_tensor_type(tensor_type)
        if tensor_type is None:
            return self
        for key, value in self.data.items():
            self.data[key] = _to_tensor(key, [value] if prepend_batch_axis else value, tensor_type)
        return self

    def to(self, device, *, non_blocking: bool = False) -> "BatchEncoding":
        """Move every tensor to `device` (a string, torch.device or index); other values stay as they are."""
        import torch

        if not isinstance(device, (str, int, torch.device)):
            raise TypeError(f"BatchEncoding.to() takes a device (str, int or torch.device), got {device!r}; "
                            "casting token ids to a dtype would corrupt them")
        self.data = {k: v.to(device=device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                     for k, v in self.data.items()}
        return self
