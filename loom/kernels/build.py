"""Build, validate, cache and load loom's C kernel library (the sources in csrc/, shipped as package data).

The library is compiled for a fixed x86-64 instruction-set level chosen at run time from the CPU's flags, never
`-march=native`: a cache directory shared by two machines (a home directory on NFS, a container layer built on
another host) must not hand one CPU's instructions to another. The level, the sources, the flags and the compiler
name the cached file; a JSON record beside it holds the file's size and SHA-256, and the library reports the build
id it was compiled with, so a truncated or foreign file is rebuilt instead of loaded. Builds happen in a private
temporary directory and are moved into place with `os.replace`, so processes building at once never load a
half-written file. Anything missing (not Linux x86-64, a CPU below the level, no compiler, a failed build) leaves
`library()` None after one warning where the user asked for kernels, and callers take the torch path.

`LOOM_KERNELS` picks the level: `auto` (default: the highest level the CPU has), `off`, `x86-64-v3` (AVX2/FMA/F16C),
`x86-64-v4` (adds AVX-512F/BW/CD/DQ/VL) or `x86-64-v4-vnni` (adds AVX-512 VNNI, BF16 and VBMI: Sapphire Rapids,
Zen 4 and later). The C sources pick their code paths from the compiler's macros (`__AVX512F__`,
`__AVX512VNNI__`, `__AVX512BF16__`, `__AVX512VBMI__`), so one source tree serves every level, and forcing a lower
level on a newer CPU runs (and tests) the older paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from loom.kernels.signatures import declare

CSRC = Path(__file__).parent / "csrc"
ENV = "LOOM_KERNELS"
LEVELS = {
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm", "xsave"),
    "x86-64-v4": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm", "xsave",
                  "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "x86-64-v4-vnni": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm", "xsave",
                       "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16",
                       "avx512vbmi"),
}
# the compiler flags of each level (gcc and clang name no -march for the VNNI level, so it extends v4)
MARCH = {"x86-64-v3": ("-march=x86-64-v3",), "x86-64-v4": ("-march=x86-64-v4",),
         "x86-64-v4-vnni": ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mavx512vbmi")}
_ALIASES = {"v3": "x86-64-v3", "v4": "x86-64-v4", "avx2": "x86-64-v3", "avx512": "x86-64-v4",
            "v4-vnni": "x86-64-v4-vnni", "vnni": "x86-64-v4-vnni"}
_OFF = ("off", "0", "none", "false", "no")
# no FMA contraction: the int4 quantizer must round exactly like the torch version
FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden")

_state: dict[str, object] = {}


def cache_dir() -> Path:
    base = os.environ.get("LOOM_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loom" / "kernels"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty off Linux x86-64)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return frozenset()


def supported_levels() -> list[str]:
    flags = cpu_flags()
    return [level for level, need in LEVELS.items() if all(f in flags for f in need)]


def chosen_level() -> tuple[str | None, str]:
    """(level to build, why): the level is None when the kernels stay off; `why` says so in words."""
    asked = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if asked in _OFF:
        return None, f"{ENV}={asked}"
    supported = supported_levels()
    if asked == "auto":
        if supported:
            return supported[-1], "auto"  # LEVELS is ordered lowest first
        return None, "this CPU lacks x86-64-v3 (AVX2/FMA/F16C) or is not Linux x86-64"
    level = _ALIASES.get(asked, asked)
    if level not in LEVELS:
        raise ValueError(f"{ENV}={asked!r} is not a kernel level; use auto, off, {', '.join(LEVELS)}")
    if level not in supported:
        missing = sorted(set(LEVELS[level]) - cpu_flags())
        return None, f"{ENV}={asked} but this CPU lacks {', '.join(missing) or 'Linux x86-64'}"
    return level, f"{ENV}={asked}"


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.[ch]"))


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build_key(cc: str, level: str) -> str:
    digest = hashlib.sha256()
    for part in [level, *FLAGS, _compiler_id(cc)]:
        digest.update(part.encode() + b"\0")
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid(target: Path, key: str) -> bool:
    """Whether `target` is the whole file its record describes (a truncated copy would die with SIGBUS)."""
    try:
        record = json.loads(target.with_suffix(".json").read_text())
        return (record.get("build_id") == key and target.stat().st_size == record.get("size")
                and _file_digest(target) == record.get("sha256"))
    except (OSError, ValueError, AttributeError):
        return False


def _compile(cc: str, level: str, key: str, out: Path) -> None:
    cmd = [cc, *FLAGS, *MARCH[level], f'-DLOOM_BUILD_ID="{key}"', f"-I{CSRC}",
           *(str(p) for p in sources() if p.suffix == ".c"), "-o", str(out), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-800:]}")


def _library_name(level: str, key: str) -> str:
    return f"loom_kernels_{level}_{key}.so"


def _install(cc: str, level: str, key: str, directory: Path) -> Path:
    """Build into a private temporary directory under `directory`, then move the library and its record into place."""
    target = directory / _library_name(level, key)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        out = Path(tmp) / target.name
        _compile(cc, level, key, out)
        record = Path(tmp) / "record.json"
        record.write_text(json.dumps({"build_id": key, "level": level, "size": out.stat().st_size,
                                      "sha256": _file_digest(out)}))
        os.replace(out, target)  # atomic: another process sees the old file, no file or the whole new one
        os.replace(record, target.with_suffix(".json"))
    return target


def locate(cc: str, level: str, key: str) -> Path:
    """A validated library for `level` built as `key` (see build_key): the cached one, or a fresh build (in a
    temporary directory when the cache directory cannot be written)."""
    target = cache_dir() / _library_name(level, key)
    if _valid(target, key):
        return target
    try:
        return _install(cc, level, key, cache_dir())
    except OSError as err:  # read-only or full cache directory: build where this process can write
        fallback = Path(tempfile.mkdtemp(prefix="loom-kernels-"))
        warnings.warn(f"loom could not write its kernel cache {cache_dir()} ({err}); built the kernels in {fallback} "
                      "for this process. Set LOOM_CACHE to a writable directory to keep the build",
                      RuntimeWarning, stacklevel=4)
        return _install(cc, level, key, fallback)


def _load(path: Path, key: str) -> ctypes.CDLL:
    lib = declare(ctypes.CDLL(str(path)))
    built = lib.loom_build_id().decode()
    if built != key:
        raise RuntimeError(f"{path} reports build {built}, expected {key}")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where the kernels are off or cannot be built here."""
    if "lib" in _state:
        return _state["lib"]
    lib = None
    level, why = chosen_level()
    if level is not None:
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            why = "no C compiler (gcc or cc) on PATH"
            warnings.warn("loom's CPU kernels are off: no C compiler (gcc or cc) on PATH, so decode-sized and "
                          f"quantized matmuls use slower torch ops. Install gcc, or set {ENV}=off to silence this",
                          RuntimeWarning, stacklevel=2)
        else:
            try:
                key = build_key(cc, level)
                lib = _load(locate(cc, level, key), key)
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                why = f"build failed: {err}"
                warnings.warn(f"loom could not build its CPU kernels ({err}); decode-sized and quantized matmuls "
                              f"use slower torch ops. Set {ENV}=off to silence this", RuntimeWarning, stacklevel=2)
    elif os.environ.get(ENV, "auto").strip().lower() not in ("auto", "", *_OFF):
        warnings.warn(f"loom's CPU kernels are off: {why}", RuntimeWarning, stacklevel=2)
    _state["lib"], _state["level"], _state["why"] = lib, level if lib is not None else None, why
    return lib


def has(flag: str) -> bool:
    """What the loaded library's flag function `flag` answers (e.g. "loom_dense_blocked": whether its level has the
    blocked fp32 GEMM), asked once per library; False where the kernels are off."""
    lib = library()
    if lib is None:
        return False
    known = _state.setdefault("flags", {}).get(flag)
    if known is None or known[0] is not lib:
        known = _state["flags"][flag] = (lib, bool(getattr(lib, flag)()))
    return known[1]


def available() -> bool:
    """Whether the kernel library is loaded (a plain bool, cheap to call and to trace under torch.compile)."""
    if "on" not in _state:
        _state["on"] = library() is not None
    return _state["on"]


def level() -> str | None:
    """The instruction-set level of the loaded library, or None where the kernels are off."""
    library()
    return _state["level"]


def describe() -> str:
    """One line for `loom env`: the level in use, or why the kernels are off."""
    lib = library()
    return f"on ({_state['level']})" if lib is not None else f"off ({_state['why']})"


def reset() -> None:
    """Forget the loaded library choice (tests that change LOOM_KERNELS or the cache); the loaded code stays mapped."""
    _state.clear()
