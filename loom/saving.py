"""Writing a model directory so that, over an existing model, it loads at every instant as the old or the new one.

Stage, then swap. Every new file is first written beside its final name as a hidden temp file and fsync'd; a
failure there (a full disk) leaves the directory as it was. Then the files are renamed into place, weights first and
config.json last, in an order where the loader (which, like the reference's, prefers `model.safetensors` over
`model.safetensors.index.json`) always finds one complete set of weights:
- one file: its rename is the switch;
- shards: they go in under names no live index refers to, then the index; the index rename (or, coming from one
  file, removing that file) is the switch. A live shard that a new shard would overwrite first gets a second
  name (a hard link, else a copy) that the live index is re-pointed to.
Files of the old set are deleted only after the switch, so a save over a model needs room for both sets of
weights (a full disk fails the save and keeps the old model). What stays open: between the weights switch and the
config rename the directory holds the new weights with the old config.json, which is the new model when the config
did not change (re-saving a trained model) and a mismatch when it did.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from loom.loading import read_index
from loom.utils import atomic_write_text, fsync_dir, write_beside

_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")  # write_beside's names
_SECOND = re.compile(r"^\.old-[0-9a-f]{8}-(?P<name>.+)$")  # a live shard's second name (ends in .safetensors, as
                                                           # loaders pick the reader by the file name)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size).upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size; use an int of bytes or a string like '5GB'")
    n, unit = float(m.group(1)), (m.group(2) or "B")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    return int(n * scale)


def write_model_dir(directory: Path, tensors: dict[str, torch.Tensor], texts: dict[str, str], *,
                    max_shard_size="5GB", variant: str | None = None, metadata: dict | None = None) -> list[str]:
    """Write tensors as one safetensors file or shards plus an index, then `texts` (file name -> content, renamed
    in this order after the weights: config.json goes last); returns the names written."""
    from safetensors.torch import save

    stem = "model" if not variant else f"model.{variant}"
    shards = _split(tensors, parse_size(max_shard_size))
    names = [f"{stem}.safetensors"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    meta = {"format": "pt", **(metadata or {})}
    staged: dict[str, Path] = {}
    try:
        for name, shard in zip(names, shards):
            staged[name] = write_beside(directory / name, save(_unshare(shard), metadata=meta))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map = dict(sorted((k, n) for n, shard in zip(names, shards) for k in shard))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            staged[f"{stem}.safetensors.index.json"] = write_beside(
                directory / f"{stem}.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
        for name, text in texts.items():
            staged[name] = write_beside(directory / name, text.encode("utf-8"))
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    _swap_in(directory, staged, stem, sharded=len(shards) > 1)
    return list(staged)


def _split(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu() if t.device.type != "cpu" or not t.is_contiguous() \
            else t.detach()
        size += nbytes
    return shards


def _unshare(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; clone the later ones (tied weights are already dropped)."""
    seen, out = set(), {}
    for k, t in shard.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        out[k] = t.clone() if key in seen or (t.numel() and t.untyped_storage().nbytes() != t.numel() *
                                               t.element_size()) else t
        if key is not None:
            seen.add(key)
    return out


def _swap_in(directory: Path, staged: dict[str, Path], stem: str, sharded: bool) -> None:
    """Rename the staged files into place (the order is the module docstring's), then delete the old set's."""
    single, index = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    pending = dict(staged)

    def put(name: str) -> None:
        os.replace(pending[name], directory / name)
        del pending[name]

    try:
        if sharded:
            shard_names = [n for n in staged if n.endswith(".safetensors")]
            _keep_live_shards_loadable(directory, index, _live_weights(single, index) & set(shard_names))
            for name in shard_names:
                put(name)
            put(index.name)
            single.unlink(missing_ok=True)
        else:
            put(single.name)
        for name in list(pending):
            put(name)
    except BaseException:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
        raise
    _remove_stale(directory, stem, keep=set(staged))
    fsync_dir(directory)


def _live_weights(single: Path, index: Path) -> set[str]:
    """The weight files a load of this directory reads now."""
    if single.is_file():
        return {single.name}
    if index.is_file():
        try:
            return {index.name, *read_index(index)}
        except OSError:  # an unreadable index loads nothing: there is nothing to keep loadable
            return set()
    return set()


def _keep_live_shards_loadable(directory: Path, index: Path, overwritten: set[str]) -> None:
    """Give each live shard that a new shard will overwrite a second name, and point the live index at it."""
    if not overwritten:
        return
    data = json.loads(index.read_text(encoding="utf-8"))
    second = {name: _second_name(directory / name).name for name in sorted(overwritten)}
    data["weight_map"] = {k: second.get(v, v) for k, v in data["weight_map"].items()}
    atomic_write_text(index, json.dumps(data, indent=2) + "\n")


def _second_name(path: Path) -> Path:
    other = path.with_name(f".old-{os.urandom(4).hex()}-{path.name}")
    try:
        os.link(path, other)
    except OSError:  # a filesystem without hard links: a copy keeps the old shard all the same
        shutil.copyfile(path, other)
        with open(other, "rb") as f:
            os.fsync(f.fileno())
    return other


def _remove_stale(directory: Path, stem: str, keep: set[str]) -> None:
    """After the switch: the old set's weight files and index, and temp files left by interrupted saves."""
    weights = re.compile(rf"^{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?$")
    for f in directory.iterdir():
        temp = _TEMP.match(f.name) or _SECOND.match(f.name)
        name = temp.group("name") if temp else f.name
        if (f.name not in keep and weights.match(name)) or (temp and name in keep):
            f.unlink(missing_ok=True)
