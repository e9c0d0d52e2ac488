"""The reference's protobuf entry points for scripts that edit SentencePiece models through protobuf.

loom reads `.model` files itself (spm_proto.py) and needs neither package; these exist for user code written against
the reference (`import_protobuf()` to get the ModelProto classes, `import_protobuf_decode_error()` for an `except`
clause that names protobuf's DecodeError only when protobuf is installed).
"""
from __future__ import annotations

from loom.availability import is_protobuf_available, is_sentencepiece_available


def import_protobuf(error_message: str = ""):
    """sentencepiece's generated `sentencepiece_model_pb2` module (ModelProto and friends)."""
    if is_sentencepiece_available() and is_protobuf_available():
        from sentencepiece import sentencepiece_model_pb2

        return sentencepiece_model_pb2
    prefix = f"{error_message} " if error_message else ""
    raise ImportError(f"{prefix}needs the SentencePiece protobuf classes, which come with the sentencepiece and "
                      "protobuf packages: pip install sentencepiece protobuf")


def import_protobuf_decode_error(error_message: str = ""):
    """protobuf's DecodeError when protobuf is installed, else `()` (an `except ()` clause catches nothing)."""
    if is_protobuf_available():
        from google.protobuf.message import DecodeError

        return DecodeError
    return ()
