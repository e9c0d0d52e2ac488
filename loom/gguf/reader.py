"""Finding a GGUF file and reading its metadata (through the `gguf` package, imported only here and when used)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loom.hub import resolve_file


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


def open_gguf(path: Path):
    """A `gguf.GGUFReader` over `path`, with an error naming the file when it is not a readable GGUF."""
    gguf = gguf_package()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise OSError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated, corrupt or "
                      "not a GGUF at all: re-download it") from None


def metadata(reader, arrays: bool = True) -> dict[str, Any]:
    """Every key-value field of the file as Python values (strings decoded, arrays as lists). With arrays=False an
    array stands as its length: a config needs no 128k-entry vocabulary decoded."""
    gguf = gguf_package()
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        is_array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
        out[key] = len(field.data) if is_array and not arrays else field.contents()
    return out
