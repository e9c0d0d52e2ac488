"""Building and loading the kernel library: a fixed instruction-set level chosen from the CPU's flags (never
-march=native), the level in the cache key, a cached file validated before it is loaded (a truncated copy is rebuilt,
never mapped), concurrent builds, a read-only cache, a missing or failing compiler, and LOOM_KERNELS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from loom.kernels import build

needs_v3 = pytest.mark.skipif("x86-64-v3" not in build.supported_levels(), reason="needs an x86-64-v3 CPU and Linux")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache and no library chosen yet (restored after the test)."""
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    monkeypatch.delenv(build.ENV, raising=False)
    return tmp_path


def _libs(root):
    return sorted(root.rglob("loom_kernels_*.so"))


@needs_v3
def test_auto_builds_the_highest_level_named_by_level_and_reuses_it(fresh):
    top = build.supported_levels()[-1]
    assert build.library() is not None and build.describe() == f"on ({top})"
    (lib,) = _libs(fresh)
    assert lib.name.startswith(f"loom_kernels_{top}_")
    record = json.loads(lib.with_suffix(".json").read_text())
    assert record["level"] == top and record["size"] == lib.stat().st_size
    assert not [p for p in lib.parent.iterdir() if p.is_dir()]  # the private build directory is gone
    stamp = lib.stat().st_mtime_ns
    build.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.library() is not None
    assert lib.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_the_build_targets_the_chosen_level_never_the_host(fresh, monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "stop here")

    monkeypatch.setattr(build.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop here"):
        build._compile("gcc", "x86-64-v3", "abc", fresh / "x.so")
    assert "-march=x86-64-v3" in seen[0] and not any("native" in a for a in seen[0])


def test_levels_follow_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(build.ENV, raising=False)
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(build.LEVELS["x86-64-v3"]))
    assert build.supported_levels() == ["x86-64-v3"] and build.chosen_level()[0] == "x86-64-v3"
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx", "sse4_2"}))  # an AVX-only CPU
    assert build.chosen_level()[0] is None
    monkeypatch.setenv(build.ENV, "x86-64-v4")
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(build.LEVELS["x86-64-v3"]))  # Haswell-class
    level, why = build.chosen_level()
    assert level is None and "avx512f" in why
    monkeypatch.delenv(build.ENV)
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(build.LEVELS["x86-64-v4"]))  # Skylake-X class
    assert build.chosen_level()[0] == "x86-64-v4"  # auto: the highest level the CPU has
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(build.LEVELS["x86-64-v4-vnni"]) | {"amx_tile"})
    assert build.chosen_level()[0] == "x86-64-v4-vnni"
    monkeypatch.setenv(build.ENV, "v3")  # a lower level on a newer CPU: its older paths run
    assert build.chosen_level()[0] == "x86-64-v3"
    monkeypatch.setenv(build.ENV, "avx9000")
    with pytest.raises(ValueError, match="LOOM_KERNELS='avx9000' is not a kernel level"):
        build.chosen_level()


def test_forcing_a_level_this_cpu_lacks_warns_once_and_uses_torch(fresh, monkeypatch):
    monkeypatch.setenv(build.ENV, "x86-64-v4")
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(build.LEVELS["x86-64-v3"]))
    with pytest.warns(RuntimeWarning, match="kernels are off: LOOM_KERNELS=x86-64-v4 but this CPU lacks avx512"):
        assert build.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.library() is None and not build.available()
    assert not _libs(fresh)


def test_off_is_silent(fresh, monkeypatch):
    monkeypatch.setenv(build.ENV, "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.library() is None
    assert build.describe() == "off (LOOM_KERNELS=off)"


@pytest.mark.skipif("x86-64-v4" not in build.supported_levels(), reason="needs an AVX-512 (x86-64-v4) CPU")
def test_v4_is_its_own_build(fresh, monkeypatch):
    monkeypatch.setenv(build.ENV, "v4")
    assert build.library() is not None and build.describe() == "on (x86-64-v4)"
    assert [p.name.split("_")[2] for p in _libs(fresh)] == ["x86-64-v4"]


def _child_loads(cache) -> None:
    """Load (building if needed) in a child process: a bad library would crash it, not the test run, and this
    process never maps the files the tests then damage (truncating a mapped library kills its process)."""
    code = ("from loom.kernels import build; import torch; assert build.library() is not None; "
            "x = torch.randn(1, 32); torch.ops.loom.rms_norm(x, torch.ones(32), 1e-6)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LOOM_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr[-2000:]


@needs_v3
def test_truncated_cached_library_is_rebuilt_not_loaded(fresh):
    """An interrupted copy of the cache once died with SIGBUS on every run."""
    _child_loads(fresh)
    (lib,) = _libs(fresh)
    size = lib.stat().st_size
    with open(lib, "r+b") as f:
        f.truncate(size // 3)
    _child_loads(fresh)
    assert lib.stat().st_size == size


@needs_v3
def test_a_library_that_does_not_match_its_record_is_rebuilt(fresh):
    _child_loads(fresh)
    (lib,) = _libs(fresh)
    lib.write_bytes(b"\x7fELF" + b"\0" * 100)  # same name, wrong content
    _child_loads(fresh)
    assert json.loads(lib.with_suffix(".json").read_text())["size"] == lib.stat().st_size > 104


@needs_v3
def test_two_processes_building_at_once(fresh):
    code = textwrap.dedent("""
        from loom.kernels import build
        import torch
        x = torch.randn(2, 64); w = torch.randn(8, 64)
        assert build.library() is not None
        torch.testing.assert_close(torch.ops.loom.dense_linear(x, w, None), x @ w.T, rtol=1e-5, atol=1e-5)
    """)
    env = {**os.environ, "LOOM_CACHE": str(fresh)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert len(_libs(fresh)) == 1
    assert not [p for p in _libs(fresh)[0].parent.iterdir() if p.is_dir()]


@needs_v3
def test_read_only_cache_builds_privately_with_one_warning(fresh, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", "/proc/loom-cannot-write-here")  # not writable, even for root
    with pytest.warns(RuntimeWarning, match="could not write its kernel cache"):
        assert build.library() is not None


def test_missing_compiler_warns_once_and_uses_torch(fresh, monkeypatch):
    if build.chosen_level()[0] is None:
        pytest.skip("the kernels are off on this CPU anyway")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert build.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not build.available()


def test_failed_build_warns_and_leaves_nothing(fresh, monkeypatch):
    if build.chosen_level()[0] is None:
        pytest.skip("the kernels are off on this CPU anyway")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="could not build its CPU kernels"):
        assert build.library() is None
    assert not _libs(fresh)
