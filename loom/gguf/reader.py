"""Finding a GGUF file and reading it: the key-value metadata and the tensor table, tensor data mapped from disk.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per string and takes tens of
seconds on a 128k-token vocabulary; the `gguf` package still supplies the quantization types' names and block sizes
and expands the types loom does not expand itself.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from loom.hub import resolve_file

# GGUF value types: id -> (struct format, size); 8 is a string, 9 an array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16}  # stored element by element; others are read as bytes


def gguf_package():
    """The `gguf` package (llama.cpp's gguf-py), or an ImportError that says how to get it."""
    try:
        import gguf
    except ImportError:
        raise ImportError("loading a GGUF file needs the `gguf` package (llama.cpp's gguf-py): pip install "
                          "'gguf>=0.10'") from None
    return gguf


def find_gguf(path_or_id: str | os.PathLike, gguf_file: str | os.PathLike, **hub_kwargs) -> Path:
    """The local path of `gguf_file`: a path to an existing file, or a file inside a directory / hub repository."""
    if Path(gguf_file).expanduser().is_file():
        return Path(gguf_file).expanduser()
    return resolve_file(path_or_id, str(gguf_file), **hub_kwargs)


class TensorInfo(NamedTuple):
    name: str
    type_name: str  # "F32", "Q4_0", ...
    shape: tuple[int, ...]  # outermost first (torch order): (out_features, in_features) for a Linear weight
    data: np.ndarray  # elements for F32/F16, else the raw bytes, (rows, bytes per row)


class GgufFile:
    """One GGUF file: `fields` (key -> value; arrays as lists, or as their lengths with arrays=False) and
    `tensors` (TensorInfo, data mapped lazily from the file)."""

    def __init__(self, path: Path, arrays: bool = True) -> None:
        gguf_package()
        self.path = Path(path)
        try:
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._view = memoryview(self._buf)
            self._parse(arrays)
        except (struct.error, ValueError, UnicodeDecodeError, IndexError, KeyError, OverflowError) as e:
            raise OSError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated, "
                          "corrupt or not a GGUF at all: re-download it") from None

    def _parse(self, arrays: bool) -> None:
        if bytes(self._view[:4]) != b"GGUF":
            raise ValueError("the file does not start with the GGUF magic bytes")
        self._pos = 4
        version, n_tensors, n_fields = self._scalar(4), self._scalar(10), self._scalar(10)
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (loom reads versions 2 and 3)")
        self.fields = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4), arrays)
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._scalar(4)
            dims = [self._scalar(10) for _ in range(n_dims)]
            infos.append((name, dims, self._scalar(4), self._scalar(10)))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _scalar(self, kind: int):
        fmt, size = _SCALARS[kind]
        value = struct.unpack_from(fmt, self._view, self._pos)[0]
        self._pos += size
        return value

    def _string(self, decode: bool = True):
        n = self._scalar(10)
        raw = self._view[self._pos:self._pos + n]
        self._pos += n
        return bytes(raw).decode("utf-8") if decode else None

    def _value(self, kind: int, arrays: bool):
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            return self._scalar(kind)
        element, count = self._scalar(4), self._scalar(10)
        if element == _STRING:
            values = [self._string(decode=arrays) for _ in range(count)]
        elif element in _NUMPY:
            values = np.frombuffer(self._buf, _NUMPY[element], count, self._pos).tolist()
            self._pos += count * np.dtype(_NUMPY[element]).itemsize
        else:
            raise ValueError(f"an array of arrays (element type {element}) is not supported")
        return values if arrays else count

    def _tensor(self, start: int, name: str, dims: list[int], kind: int, offset: int) -> TensorInfo:
        gguf = gguf_package()
        qtype = gguf.GGMLQuantizationType(kind)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(dims))  # GGUF lists dimensions innermost first
        rows, cols = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
        if qtype.name in _ELEMENT_DTYPES:
            dtype, count = _ELEMENT_DTYPES[qtype.name], rows * cols
            data = np.frombuffer(self._buf, dtype, count, start + offset).reshape(rows, cols)
        else:
            row_bytes = cols // block * block_bytes
            data = np.frombuffer(self._buf, np.uint8, rows * row_bytes, start + offset).reshape(rows, row_bytes)
        return TensorInfo(name, qtype.name, shape, data)


def open_gguf(path: Path, arrays: bool = True) -> GgufFile:
    return GgufFile(path, arrays)
