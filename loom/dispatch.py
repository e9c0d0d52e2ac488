"""device_map support: explicit {module prefix: device} maps, and "auto"/"balanced"/"sequential" maps with CPU/disk
offload through accelerate's big-model dispatch (an optional dependency, imported only here)."""
from __future__ import annotations

import torch

from loom.utils import require

_AUTO = ("auto", "balanced", "balanced_low_0", "sequential")


def _normalise_device(value, where: str):
    if value == "disk":
        return "disk"
    if isinstance(value, int):
        return torch.device("cuda", value)
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map entry {where!r} -> {value!r} is not a device; use 'cpu', 'cuda:0', an int GPU "
                         "index or 'disk'") from None


def device_lookup(device_map: dict):
    """name -> device by the longest matching module prefix; a name with no entry is an error."""
    entries = sorted(((k, _normalise_device(v, k)) for k, v in device_map.items()), key=lambda kv: -len(kv[0]))

    def device_for(name: str):
        for prefix, device in entries:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                return torch.device("cpu") if device == "disk" else device  # disk: staged on CPU, then offloaded
        raise ValueError(f"device_map has no entry for {name}; add its module (or '' for everything else)")

    return device_for


def plan_device_map(cls, config, device_map, max_memory, offload_folder, dtype):
    """(device_for, dispatch) for a dict or automatic device_map. dispatch(model) -> model places hooks when the
    model spans several devices or offloads to disk, and is None when one device holds everything."""
    if isinstance(device_map, str):
        if device_map not in _AUTO:
            raise ValueError(f"device_map={device_map!r} is not understood; use 'auto', 'cpu', a device or a dict")
        device_map = infer_device_map(cls, config, max_memory, dtype, device_map)
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be a string, a device or a dict, got {type(device_map).__name__}")
    device_for = device_lookup(device_map)
    targets = {str(v) for v in device_map.values()}
    if "disk" in targets and not offload_folder:
        raise ValueError("device_map puts modules on 'disk' but no offload_folder was given; pass "
                         "offload_folder='some/dir' to from_pretrained")
    if len(targets) <= 1 and "disk" not in targets:
        return device_for, None

    def dispatch(model):
        accelerate = require("accelerate", "device_map with several devices or disk offload")
        return accelerate.dispatch_model(model, device_map=device_map, offload_dir=offload_folder)

    return device_for, dispatch


def infer_device_map(cls, config, max_memory, dtype, strategy: str) -> dict:
    accelerate = require("accelerate", f"device_map={strategy!r}")
    from loom.loading import empty_init

    with empty_init():
        model = cls(config)
    if dtype is not None:
        model.to(dtype)
    # accelerate matches class names exactly: name every module class that derives from a no-split class, so a
    # variant's own layer class (Qwen2DecoderLayer < LlamaDecoderLayer) is not split either
    keep = set(cls._no_split_modules)
    keep |= {type(m).__name__ for m in model.modules()
             if any(k.__name__ in cls._no_split_modules for k in type(m).__mro__)}
    kwargs = dict(no_split_module_classes=sorted(keep), dtype=dtype)
    if strategy != "sequential" and max_memory is None:
        max_memory = accelerate.utils.get_balanced_memory(model, low_zero=strategy == "balanced_low_0", **kwargs)
    device_map = accelerate.infer_auto_device_map(model, max_memory=max_memory, **kwargs)
    if device_map.get("") == "disk":
        raise ValueError(f"max_memory={max_memory} leaves no room for any module outside the disk; raise the CPU/GPU "
                         "budget so that at least the first block fits")
    return device_map
