"""Distributed checkpoints with torch.distributed.checkpoint (DCP), and conversion to a normal checkpoint.

A DCP checkpoint directory holds the sharded model + optimizer state (`.metadata`, `__*_*.distcp`), the model's
`config.json` and `loom_state.json` (step and other plain training state). It reloads at any world size or mesh
shape: DCP reshards by the fully-qualified parameter names. `dcp_to_hf` turns it into a `from_pretrained` directory
in one process; `save_pretrained_distributed` writes that format directly from a sharded model.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from loom.utils import atomic_write_text

STATE_FILE = "loom_state.json"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes' one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_dcp(checkpoint_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             extra_state: dict | None = None) -> Path:
    """Save model (+ optimizer) state from every rank into `checkpoint_dir`; every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    path = Path(checkpoint_dir)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    if _is_main():
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if _is_main():
        config = getattr(model, "config", None)
        if config is not None:
            config.architectures = [model_class_name(model)]
            config.save_pretrained(path)
        atomic_write_text(path / STATE_FILE, json.dumps(extra_state or {}, indent=2) + "\n")
    _barrier()
    return path


def load_dcp(checkpoint_dir: str | os.PathLike, model: nn.Module,
             optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a DCP checkpoint into an already parallelised `model` (+ optimizer), resharding as needed.

    Returns the extra state saved with it. Raises a clear error for a missing directory or a checkpoint of another
    model (different parameter names or shapes).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a DCP checkpoint (no .metadata file); pass the directory written "
                                "by save_dcp / the Trainer")
    _check_compatible(path, model)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(model, state["model"])
    extra = path / STATE_FILE
    return json.loads(extra.read_text(encoding="utf-8")) if extra.is_file() else {}


def _saved_model_tensors(path: Path) -> dict:
    """Model key -> TensorStorageMetadata of a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {k[len("model."):]: v for k, v in meta.state_dict_metadata.items()
            if k.startswith("model.") and hasattr(v, "size")}


def _check_compatible(path: Path, model: nn.Module) -> None:
    saved = _saved_model_tensors(path)
    expected = {}
    for name, t in model.state_dict().items():
        expected[name] = tuple(t.shape)
    missing = sorted(set(expected) - set(saved))
    wrong = sorted(k for k in set(expected) & set(saved) if tuple(saved[k].size) != expected[k])
    if missing or wrong:
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if wrong:
            detail.append("shape differs for " + ", ".join(f"{k} (saved {tuple(saved[k].size)}, model "
                                                           f"{expected[k]})" for k in wrong[:5]))
        raise ValueError(f"the DCP checkpoint {path} was saved from another model: {'; '.join(detail)}. Load it "
                         "into the model it was trained with")


def model_class_name(model: nn.Module) -> str:
    """The user's class name under FSDP2's `FSDP<Class>` and context parallel's wrapper subclasses."""
    for cls in type(model).__mro__:
        if not cls.__name__.startswith("FSDP") and not cls.__name__.startswith("ContextParallel"):
            return cls.__name__
    return type(model).__name__


def dcp_to_hf(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, *, dtype=None,
              max_shard_size: int | str = "5GB") -> Path:
    """Write a normal checkpoint (config.json + safetensors) that `from_pretrained` loads in one process."""
    import torch.distributed.checkpoint as dcp

    from loom.auto import model_class_by_name
    from loom.utils import parse_dtype

    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a DCP checkpoint (no .metadata file)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; it was not written by loom's save_dcp, so its model "
                                "class is unknown")
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    arch = (raw.get("architectures") or [None])[0]
    cls = model_class_by_name(arch) if arch else None
    if cls is None:
        raise ValueError(f"{path}/config.json names the architecture {arch!r}, which loom does not know")
    config = cls.config_class.from_pretrained(path)
    saved = _saved_model_tensors(path)
    state = {"model": {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items()}}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state["model"], strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.state_dict().items() if p.is_meta and n not in model.tied_parameter_names()]
    if still_meta:
        raise ValueError(f"{path} lacks tensors the model needs: {', '.join(still_meta[:5])}")
    dtype = parse_dtype(dtype)
    if dtype not in (None, "auto"):
        model.to(dtype)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    return Path(output_dir)


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor (DTensors gathered); a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_gathered(model: nn.Module, save_directory: str | os.PathLike, full_state: dict, **kwargs) -> None:
    """`model.save_pretrained` with tensors from `gather_full_state`; records the user's class, not FSDP's."""
    tied = model.tied_parameter_names() if hasattr(model, "tied_parameter_names") else set()
    transposed = getattr(model, "_transposed_checkpoint_weights", ())
    tensors = {k: (v.t() if any(k.endswith(s) for s in transposed) else v) for k, v in full_state.items()
               if k not in tied}
    type(model).save_pretrained(model, save_directory, state_dict=tensors, **kwargs)
    model.config.architectures = [model_class_name(model)]
    model.config.save_pretrained(save_directory)


def save_pretrained_distributed(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """`save_pretrained` for a tensor-parallel / FSDP model: gathers full tensors, rank 0 writes; all ranks call."""
    if kwargs.get("push_to_hub"):  # on every rank, before the collective; write_gathered fixes config.json last
        raise ValueError("save_pretrained of a parallelised model does not push to the hub; save it, then upload "
                         "the folder with huggingface_hub's upload_folder")
    full = gather_full_state(model)
    if _is_main():
        write_gathered(model, save_directory, full, **kwargs)
    _barrier()
