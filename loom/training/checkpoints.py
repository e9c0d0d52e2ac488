"""Training checkpoints `output_dir/checkpoint-N/`: written atomically, found, validated, rotated, restored.

A checkpoint is first written to `tmp-checkpoint-N/` and renamed when complete, so a run killed while saving leaves
the previous checkpoints intact and the partial folder is never mistaken for a checkpoint (it starts with "tmp-").
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

PREFIX = "checkpoint"
TMP_PREFIX = "tmp-checkpoint"
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "data_state.json",
                  "training_args.json", "config.json")
_NUMBERED = re.compile(rf"^{PREFIX}-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders in output_dir, oldest (smallest N) first; temporary folders are not listed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NUMBERED.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def check_complete(path: Path) -> None:
    """Raise if a checkpoint folder lacks a file needed to resume exactly."""
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a directory")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if not any(path.glob("model*.safetensors")):
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); it cannot resume the "
                                "run exactly. Pass another checkpoint folder or start a fresh run")


# -- RNG states ------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) generator states, in a form torch.load(weights_only=True) accepts."""
    state = {"python": _py_state_as_lists(random.getstate()), "cpu": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_py_state_from_lists(state["python"]))
    torch.set_rng_state(state["cpu"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_as_lists(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_lists(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# -- writing ---------------------------------------------------------------------------------------------------------
def write_checkpoint(output_dir: str | Path, step: int, write_files) -> Path:
    """Call write_files(tmp_dir) to fill a temporary folder, then rename it to checkpoint-<step> atomically."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}-{step}"
    tmp = root / f"{TMP_PREFIX}-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    tmp.mkdir()
    write_files(tmp)
    _fsync_dir(tmp)
    if final.exists():
        # re-saving a step (a resumed run passing an old checkpoint's step): swap, then drop the old one
        old = root / f"{TMP_PREFIX}-{step}-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def _fsync_dir(path: Path) -> None:
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


def save_torch(obj, path: Path) -> None:
    """torch.save into a file, fsync'd (the folder rename that follows makes it visible)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_json(obj, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rotate(output_dir: str | Path, limit: int | None, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`, never one in `keep` (best, latest); returns the deleted."""
    if not limit:
        return []
    found = list_checkpoints(output_dir)
    keep = {Path(k).resolve() for k in keep if k}
    deletable = [p for p in found if p.resolve() not in keep]
    excess = len(found) - limit
    deleted = []
    for path in deletable[:max(0, excess)]:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted
