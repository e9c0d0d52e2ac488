"""import_protobuf / import_protobuf_decode_error: the same objects as the reference's where the packages are
installed, a clear ImportError or an empty except-tuple where they are not."""
from __future__ import annotations

import importlib

import pytest

from loom.tokenization import import_protobuf, import_protobuf_decode_error
from loom.tokenization import protobuf as helpers


def test_same_objects_as_the_reference():
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    convert_slow_tokenizer = importlib.import_module("transformers.convert_slow_tokenizer")
    tokenization_utils_base = importlib.import_module("transformers.tokenization_utils_base")
    assert import_protobuf() is convert_slow_tokenizer.import_protobuf()
    assert import_protobuf().ModelProto is not None
    assert import_protobuf_decode_error() is tokenization_utils_base.import_protobuf_decode_error()


def test_without_protobuf(monkeypatch):
    monkeypatch.setattr(helpers, "is_protobuf_available", lambda: False)
    assert import_protobuf_decode_error() == ()
    with pytest.raises(ValueError, match="real error"):  # an empty except-tuple masks nothing
        try:
            raise ValueError("real error")
        except import_protobuf_decode_error():
            pass
    with pytest.raises(ImportError, match="converting a model needs the SentencePiece protobuf classes.*pip install"):
        import_protobuf("converting a model")
