"""Small shared helpers: atomic file writes, dtype parsing, optional-dependency imports."""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float64": "float64", "double": "float64",
}


def parse_dtype(value, argument: str = "dtype"):
    """Turn a dtype argument ("bfloat16", "torch.float16", torch.float32) into a torch.dtype; "auto"/None pass."""
    import torch

    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = _DTYPES.get(value.removeprefix("torch."))
        if name is not None:
            return getattr(torch, name)
    raise ValueError(f"{argument}={value!r} is not a dtype; use one of 'float32', 'bfloat16', 'float16', 'auto' "
                     "or a torch.dtype")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def require(package: str, feature: str, pip_name: str | None = None):
    """Import an optional dependency, or raise an ImportError that says what needs it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"{feature} needs the optional package '{pip_name or package}', which is not installed "
                          f"({e}); install it with `pip install {pip_name or package}`") from None


# `transformers.utils` exports these; so does loom.utils (lazily: the tokenization package imports `tokenizers`).
# They come from their own module, not the tokenization package, whose modules import loom.utils (no cycle).
_TOKENIZATION_NAMES = ("get_json_schema", "DocstringParsingException", "TypeHintParsingException")


def __getattr__(name: str):
    if name in _TOKENIZATION_NAMES:
        return getattr(importlib.import_module("loom.tokenization.tool_schema"), name)
    raise AttributeError(f"module 'loom.utils' has no attribute {name!r}")
