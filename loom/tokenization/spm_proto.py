"""Read a SentencePiece `.model` file (a ModelProto protobuf) without protobuf or sentencepiece installed.

Only the fields a conversion needs are decoded: the pieces (text, score, type), the trainer spec (model type, byte
fallback, special ids and pieces) and the normalizer spec (precompiled charsmap, whitespace options). Field numbers
are those of sentencepiece_model.proto; unknown fields are skipped by wire type.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class SpmModel:
    pieces: list[Piece] = field(default_factory=list)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes):
    """Yield (field number, wire type, value) for each field of a protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated message")
        yield number, wire, value


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _piece(data: bytes) -> Piece:
    piece = Piece("")
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            piece.piece = value.decode("utf-8")
        elif number == 2 and wire == 5:
            piece.score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == 0:
            piece.type = value
    return piece


_TRAINER_INTS = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
_TRAINER_STRS = {45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece"}
_NORMALIZER_BOOLS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


def parse_spm_model(data: bytes) -> SpmModel:
    """Decode the bytes of a SentencePiece ModelProto."""
    model = SpmModel()
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            model.pieces.append(_piece(value))
        elif number == 2 and wire == 2:
            for n, w, v in _fields(value):
                if n in _TRAINER_INTS and w == 0:
                    setattr(model, _TRAINER_INTS[n], _int32(v))
                elif n in _TRAINER_STRS and w == 2:
                    setattr(model, _TRAINER_STRS[n], v.decode("utf-8"))
                elif n == 35 and w == 0:
                    model.byte_fallback = bool(v)
        elif number == 3 and wire == 2:
            for n, w, v in _fields(value):
                if n == 2 and w == 2:
                    model.precompiled_charsmap = bytes(v)
                elif n in _NORMALIZER_BOOLS and w == 0:
                    setattr(model, _NORMALIZER_BOOLS[n], bool(v))
    return model


def read_spm_model(path: str | Path) -> SpmModel:
    """Read and decode a `.model` file; OSError naming the file when it is not a SentencePiece model."""
    path = Path(path)
    try:
        model = parse_spm_model(path.read_bytes())
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise OSError(f"{path} is not a valid SentencePiece model file ({e}); re-download it or pass the "
                      "tokenizer.json of the model instead") from None
    if not model.pieces:
        raise OSError(f"{path} holds no SentencePiece pieces; it is empty or not a SentencePiece model file")
    if model.model_type not in (UNIGRAM, BPE):
        raise OSError(f"{path} is a SentencePiece model of type {model.model_type} (word/char); only Unigram and "
                      "BPE models can be converted")
    return model
