"""Small shared helpers: atomic file writes, dtype parsing, optional-dependency imports."""
from __future__ import annotations

import importlib
import os
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


def write_beside(path: Path, data: bytes) -> Path:
    """Write `data` to a new hidden temp file next to `path`, fsync'd; returns the temp file's path.

    The file is created with mode 0666 and the umask applied by the kernel, as `open(path, "w")` would create it
    (mkstemp's 0600 would make saved models unreadable to the group)."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see a half-written file."""
    tmp = write_beside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make the renames inside a directory durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
