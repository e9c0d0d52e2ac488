"""`tok.pad(features)`: pad already-encoded features to one length, as data collators need.

Accepts one encoded example (a dict of id lists), a dict of batched lists, or a list of dicts (a DataLoader batch);
values may be lists, numpy arrays or torch tensors. Only the model inputs that padding is defined for are padded:
input_ids (pad id), token_type_ids (pad type id), attention_mask (0), special_tokens_mask (1).

As in the reference, an attention mask that is not wanted (return_attention_mask=False, or None for a model without
one) is neither created nor padded: a mask already in the features passes through as it came.
"""
from __future__ import annotations

from collections.abc import Mapping

from .arguments import LARGE_INTEGER, _padding_name
from .batch_encoding import BatchEncoding, check_tensor_type


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


def _tensor_kind(value) -> str | None:
    module = type(value).__module__
    if module.startswith("torch"):
        return "pt"
    if module.startswith("numpy"):
        return "np"
    return None


def _as_columns(encoded_inputs) -> dict:
    if isinstance(encoded_inputs, (list, tuple)):
        if not encoded_inputs:
            raise ValueError("tok.pad() got an empty list of features; pass at least one encoded example")
        if not all(isinstance(f, Mapping) for f in encoded_inputs):
            raise TypeError("tok.pad() takes a dict of features or a list of dicts (one per example), got a list "
                            f"holding {type(encoded_inputs[0]).__name__}")
        keys = list(encoded_inputs[0].keys())
        return {k: [f[k] for f in encoded_inputs] for k in keys}
    if isinstance(encoded_inputs, Mapping):
        return dict(encoded_inputs.items())
    raise TypeError(f"tok.pad() takes a dict of features or a list of dicts, got {type(encoded_inputs).__name__}")


def _pad_row(row: list, length: int, value, left: bool) -> list:
    missing = length - len(row)
    if missing <= 0:
        return row
    return [value] * missing + row if left else row + [value] * missing


def pad(tok, encoded_inputs, *, padding=True, max_length=None, pad_to_multiple_of=None, padding_side=None,
        return_attention_mask=None, return_tensors=None) -> BatchEncoding:
    """Pad features with the tokenizer's pad token and padding side; see the module docstring."""
    columns = _as_columns(encoded_inputs)
    main = tok.model_input_names[0]
    if main not in columns:
        raise ValueError(f"tok.pad() needs the features to include '{main}', but they only have {list(columns)}")
    first = columns[main]
    if return_tensors is None:  # tensors in, tensors out, as in the reference
        probe = first[0] if isinstance(first, (list, tuple)) and len(first) else first
        return_tensors = _tensor_kind(probe)
    return_tensors = check_tensor_type(return_tensors)
    columns = {k: _plain(v) if not isinstance(v, list) else [_plain(x) for x in v] for k, v in columns.items()}
    strategy = _padding_name(padding)
    side = padding_side or tok.padding_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    if strategy == "max_length" and max_length is None:
        if tok.model_max_length >= LARGE_INTEGER:
            raise ValueError("padding='max_length' needs max_length=...: this tokenizer's model_max_length is "
                             "unknown")
        max_length = tok.model_max_length
    if strategy is not None and tok.pad_token_id is None:
        raise ValueError("tok.pad() was asked to pad but the tokenizer has no pad token; set one, e.g. "
                         "`tok.pad_token = tok.eos_token`")
    want_mask = "attention_mask" in tok.model_input_names if return_attention_mask is None else return_attention_mask

    single = not columns[main] or not isinstance(columns[main][0], (list, tuple))
    rows = {k: [v] for k, v in columns.items()} if single else columns
    lengths = [len(r) for r in rows[main]]
    if any(len(v) != len(lengths) for v in rows.values()):
        raise ValueError(f"tok.pad(): the features have different batch sizes: "
                         f"{ {k: len(v) for k, v in rows.items()} }")
    if want_mask and "attention_mask" not in rows:
        rows["attention_mask"] = [[1] * n for n in lengths]
    if strategy is not None:
        length = max(lengths, default=0) if strategy == "longest" else max_length
        if pad_to_multiple_of and length % pad_to_multiple_of:
            length += pad_to_multiple_of - length % pad_to_multiple_of
        fills = {main: tok.pad_token_id, "token_type_ids": tok.pad_token_type_id, "special_tokens_mask": 1}
        if want_mask:
            fills["attention_mask"] = 0
        left = side == "left"
        for key, value in fills.items():
            if key in rows:
                rows[key] = [_pad_row(list(r), length, value, left) for r in rows[key]]
        kept = rows.get("attention_mask")
        if return_tensors is not None and kept is not None and not want_mask and \
                any(len(m) != len(r) for m, r in zip(kept, rows[main])):
            raise ValueError("tok.pad() cannot make tensors: return_attention_mask=False leaves the features' "
                             "existing 'attention_mask' unpadded (as the reference does), so its rows differ in "
                             "length; drop 'attention_mask' from the features or pass return_attention_mask=True")
    out = {k: v[0] for k, v in rows.items()} if single else rows
    return BatchEncoding(out, tensor_type=return_tensors)
