"""Training checkpoints `output_dir/checkpoint-N/`: written atomically, found, validated, rotated, restored.

A checkpoint is first written to `tmp-checkpoint-N/`, renamed to `tmp-checkpoint-N-new/` once complete, then to
`checkpoint-N/`. A run killed while saving leaves the previous checkpoints intact and the partial folder is never
mistaken for a checkpoint (it starts with "tmp-"). Replacing an existing `checkpoint-N` (a resumed run saving a step
again) moves it to `tmp-checkpoint-N-old/` for the moment between two renames; a kill there leaves no
`checkpoint-N`, and the next save or resume puts the newer complete copy back (`recover_interrupted`). Only a
partial `tmp-checkpoint-N` is ever deleted as a leftover: a complete copy is never the one thrown away.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

from loom.utils import fsync_dir

PREFIX = "checkpoint"
TMP_PREFIX = "tmp-checkpoint"
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "data_state.json",
                  "training_args.json")
_NUMBERED = re.compile(rf"^{PREFIX}-(\d+)$")
_SWAPPING = re.compile(rf"^{TMP_PREFIX}-(\d+)-(new|old)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders in output_dir, oldest (smallest N) first; temporary folders are not listed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NUMBERED.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint-N folder, after finishing any save a kill left half-done (recover_interrupted)."""
    recover_interrupted(output_dir)
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def check_complete(path: Path) -> None:
    """Raise if a checkpoint folder lacks a file needed to resume exactly."""
    if not path.is_dir() and _NUMBERED.match(path.name):
        recover_interrupted(path.parent)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a directory")
    state_file = path / "data_state.json"
    plain = state_file.is_file() and json.loads(state_file.read_text(encoding="utf-8")).get("model_format") == \
        "state_dict"  # a plain nn.Module has no config.json
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    # the model's weights, or only the adapters where a PeftModel was trained
    adapters = (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    if not adapters:
        missing += [] if (path / "config.json").is_file() or plain else ["config.json"]
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
    recover_interrupted(root)
    final, tmp, new, old = _folders(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # partial: left by a run killed while writing it (complete copies are renamed first)
    tmp.mkdir()
    write_files(tmp)
    fsync_dir(tmp)
    os.replace(tmp, new)
    _install(final, new, old)
    fsync_dir(root)
    return final


def _folders(root: Path, step: int) -> tuple[Path, Path, Path, Path]:
    """checkpoint-N, and its temporary folders: being written, complete, replaced."""
    tmp = root / f"{TMP_PREFIX}-{step}"
    return root / f"{PREFIX}-{step}", tmp, tmp.with_name(tmp.name + "-new"), tmp.with_name(tmp.name + "-old")


def _install(final: Path, new: Path, old: Path) -> None:
    """Rename the complete copy `new` to `final`; a copy already there goes aside to `old`, deleted last."""
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # an older copy still: `final` is complete
        os.replace(final, old)
    os.replace(new, final)  # a kill just before this leaves no `final`: recover_interrupted puts `new` in
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted(output_dir: str | Path) -> list[Path]:
    """Finish the checkpoint swaps that a killed save left half-done; returns the checkpoints put back in place.

    A complete new copy (tmp-checkpoint-N-new) goes in, replacing checkpoint-N when that exists too; without one,
    a missing checkpoint-N gets back its old copy (tmp-checkpoint-N-old). A tmp-checkpoint-N beside a -old folder
    and no checkpoint-N is the complete new copy of loom before the -new stage. Every rank of a run may call this
    at once: a step another process has just finished is looked at again."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    restored = []
    for step in sorted({int(m.group(1)) for p in root.iterdir() if (m := _SWAPPING.match(p.name))}):
        for attempt in range(3):
            try:
                source = _recover_step(*_folders(root, step))
                break
            except OSError:
                if attempt == 2:
                    raise
        if source is not None:
            restored.append(root / f"{PREFIX}-{step}")
            warnings.warn(f"{restored[-1]}: finished a save that an interrupted run left half-done (the complete "
                          f"copy {source} is now in place)", stacklevel=2)
    if restored:
        fsync_dir(root)
    return restored


def _recover_step(final: Path, tmp: Path, new: Path, old: Path) -> str | None:
    source = new.name
    if not new.is_dir() and not final.exists() and tmp.is_dir() and old.is_dir():
        os.replace(tmp, new)
        source = tmp.name
    if new.is_dir():
        _install(final, new, old)
        return source
    if old.is_dir() and not final.exists():
        os.replace(old, final)
        return old.name
    shutil.rmtree(old, ignore_errors=True)
    return None


def save_model_files(model, folder: Path) -> None:
    """save_pretrained, or for a plain nn.Module its weights as model.safetensors (as the reference)."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
        return
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


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
