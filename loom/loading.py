"""Streaming a checkpoint into a model built on the meta device.

One path for every load: discover the checkpoint files, then read tensor by tensor from safetensors straight into
the final dtype/device/shard/quantized form. Formats take part through their `LoadHook`s (loom/load_hooks.py): each
tensor goes to the first hook whose `load_tensor` takes it, else it is read as stored; a key the model has no slot
for goes to `load_extra_tensor`. The stages around this one are in loom/load_stages.py.

A hook's `source` is a TensorSource: `.shape`, `.dtype`, `.get()` (whole tensor) and `.slice(dim, start, stop)` (reads
only that part of the file, for tensor-parallel shards).
"""
from __future__ import annotations

import contextlib
import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loom.hub import resolve_file, safe_join
from loom.load_hooks import LoadHook, checked_hooks

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def empty_init():
    """Build modules on the meta device with torch's init functions switched off.

    Random init of weights about to be overwritten is wasted work, and on the meta device it is worse: each
    init op runs through meta decompositions that import torch._dynamo (seconds of cold start)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    for name in saved:
        setattr(nn.init, name, _skip_init)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _skip_init(tensor, *args, **kwargs):
    return tensor


def _variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, ext = name.split(".", 1)
    return f"{stem}.{variant}.{ext}"


@dataclass
class CheckpointFiles:
    files: list[Path]
    safetensors: bool
    index: Path | None = None


def find_checkpoint_files(path_or_id, *, variant=None, use_safetensors=None, **hub_kwargs) -> CheckpointFiles:
    """The weight files of a checkpoint: safetensors (single or sharded) first, then legacy pytorch_model.bin."""
    candidates = []
    if use_safetensors is not False:
        candidates += [(SAFE_WEIGHTS, True, False), (SAFE_INDEX, True, True)]
    if use_safetensors is not True:
        candidates += [(BIN_WEIGHTS, False, False), (BIN_INDEX, False, True)]
    for name, safe, is_index in candidates:
        path = resolve_file(path_or_id, _variant(name, variant), required=False, **hub_kwargs)
        if path is None:
            continue
        if not is_index:
            return CheckpointFiles([path], safe)
        files = []
        for shard in read_index(path):
            local = safe_join(path.parent, shard, path)
            if not local.is_file():  # an index fetched from the hub: fetch its shards too
                sub = hub_kwargs.get("subfolder", "")
                local = resolve_file(path_or_id, shard, required=False, **hub_kwargs) if not sub else None
            if local is None or not Path(local).is_file():
                raise OSError(f"{path} lists the shard {shard}, which is missing; re-download or re-save the model")
            files.append(Path(local))
        return CheckpointFiles(files, safe, path)
    wanted = ", ".join(_variant(n, variant) for n, _, _ in candidates)
    raise OSError(f"no weights found for '{path_or_id}': looked for {wanted}")


def read_index(path: Path) -> list[str]:
    """Shard file names of an index, in first-appearance order; each checked to stay inside the folder."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OSError(f"{path} is not a valid weights index (needs a 'weight_map' object): {e}") from None
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        safe_join(path.parent, shard, path)
    return shards


# -- reading tensors --------------------------------------------------------------------------------------------
class TensorSource:
    """Lazy handle on one tensor of a checkpoint file."""

    def __init__(self, handle, key: str, file: Path, transposed: bool = False) -> None:
        self.handle, self.key, self.file, self.transposed = handle, key, file, transposed
        if isinstance(handle, dict):
            t = handle[key]
            shape, self.dtype = tuple(t.shape), t.dtype
        elif isinstance(handle, SafetensorsReader):
            entry = handle.entries[key]
            shape, self.dtype = tuple(entry["shape"]), _ST_DTYPES.get(entry["dtype"])
        else:
            sl = handle.get_slice(key)
            shape, self.dtype = tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), None)
        self.shape = tuple(reversed(shape)) if transposed else shape

    def get(self) -> torch.Tensor:
        try:
            t = self.handle[self.key] if isinstance(self.handle, dict) else self.handle.get_tensor(self.key)
        except Exception as e:
            raise OSError(f"could not read tensor '{self.key}' from {self.file}: {e}; the file may be truncated or "
                          "corrupt, re-download or re-save it") from None
        return t.t() if self.transposed else t

    def slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows/columns [start, stop) along `dim` of the (model-layout) tensor, reading only that part."""
        if isinstance(self.handle, dict):
            return self.get().narrow(dim, start, stop - start)
        file_dim = (1 - dim) if self.transposed and len(self.shape) == 2 else dim
        sl = self.handle.get_slice(self.key)
        index = tuple([slice(None)] * file_dim + [slice(start, stop)])
        t = sl[index]
        return t.t() if self.transposed else t


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
              "F8_E5M2": getattr(torch, "float8_e5m2", None),
              "F8_E8M0": getattr(torch, "float8_e8m0fnu", None)}  # power-of-two scales (ue8m0, MX formats)


def open_checkpoint(file: Path, eager: bool = False):
    """A handle for one file: safetensors through a private mmap (zero-copy, pages read on first touch) or, with
    `eager`, through plain reads (for loads that convert every tensor: a quantizer's fp32 pages must not stay
    resident); .bin files through torch.load(weights_only=True), mmap'd unless in the legacy format."""
    if file.suffix == ".gguf":
        from loom.gguf.tensors import GgufCheckpoint

        return GgufCheckpoint(file)
    if file.suffix == ".safetensors":
        if eager:
            return SafetensorsReader(file)
        from safetensors import safe_open

        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:
            raise OSError(f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt, "
                          "re-download or re-save it") from None
    try:
        # the legacy (pre-zipfile) format cannot be mapped: it is read into memory, with the same weights_only check
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as e:
        unsafe = re.search(r"GLOBAL (\S+\.\w+) was not an allowed global", str(e))
        if unsafe:
            raise OSError(f"{file} pickles the Python object {unsafe.group(1)} besides tensors; loom refuses to "
                          "unpickle it, as unpickling can run arbitrary code (torch.load(weights_only=True) refused "
                          "it). If you trust the file, convert it to safetensors with the code that wrote it") from None
        reason = "malformed pickle data" if isinstance(e, pickle.UnpicklingError) else \
            next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OSError(f"{file} is not a readable PyTorch checkpoint ({reason}); it may be truncated or corrupt, "
                      "re-download or re-save it") from None
    if not isinstance(state, dict):
        raise OSError(f"{file} does not hold a state dict")
    return state


class SafetensorsReader:
    """Reads safetensors tensors with plain file reads into fresh memory (no mapping of the file stays alive)."""

    def __init__(self, file: Path) -> None:
        from safetensors import safe_open

        self.file = file
        try:
            # safetensors' own header checks (offsets in order, contiguous and covering the data exactly, byte
            # sizes matching shapes and dtypes) before any offset of the header is trusted for a read
            with safe_open(str(file), framework="pt"):
                pass
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except Exception as e:
            raise OSError(f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt, "
                          "re-download or re-save it") from None
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries = header
        self._sliced = None

    def keys(self):
        return self.entries.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.file, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise OSError(f"{self.file}: short read of tensor '{key}'; the file may be truncated")
        return buf.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def get_slice(self, key: str):
        if self._sliced is None:
            from safetensors import safe_open

            self._sliced = safe_open(str(self.file), framework="pt")
        return self._sliced.get_slice(key)


# -- key handling -----------------------------------------------------------------------------------------------
_LEGACY = [(re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias")]


def rename_key(key: str) -> str:
    for pattern, repl in _LEGACY:
        key = pattern.sub(repl, key)
    return key


def prefix_fixer(model: nn.Module, ckpt_keys: list[str], expected: set[str]):
    """A function mapping checkpoint keys to model keys across the base-model prefix (`bert.`, `model.`, ...)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return lambda k: k
    p = prefix + "."
    ckpt_has = any(k.startswith(p) for k in ckpt_keys)
    model_has = any(k.startswith(p) for k in expected)
    if model_has and not ckpt_has:
        # base checkpoint into a head model: prefix the keys that belong to the base model
        return lambda k: k if k in expected else (p + k)
    if ckpt_has and not model_has:
        return lambda k: k[len(p):] if k.startswith(p) else k
    return lambda k: k


# -- assigning --------------------------------------------------------------------------------------------------
def set_tensor(model: nn.Module, name: str, value) -> None:
    """Replace parameter or buffer `name` of `model` (which may be on the meta device) by `value`."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        if not isinstance(value, nn.Parameter):
            grad = old.requires_grad if old is not None else True
            value = nn.Parameter(value, requires_grad=grad and (value.is_floating_point() or value.is_complex()))
        module._parameters[attr] = value
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, value)


@dataclass
class LoadingInfo:
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    error_msgs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """output_loading_info's dict: sets of keys, as the reference's."""
        return {"missing_keys": set(self.missing_keys), "unexpected_keys": set(self.unexpected_keys),
                "mismatched_keys": {(k, tuple(a), tuple(b)) for k, a, b in self.mismatched_keys},
                "error_msgs": self.error_msgs}


def _target_dtype(tensor_dtype, dtype):
    if dtype is None or not (tensor_dtype is not None and tensor_dtype.is_floating_point):
        return tensor_dtype
    return dtype


def stream_checkpoint(model: nn.Module, ckpt: CheckpointFiles, *, dtype, device_for, hooks=(),
                      ignore_mismatched_sizes: bool = False, private: bool = False) -> LoadingInfo:
    """Load every tensor of `ckpt` into `model` (built on meta, already prepared by `hooks`: LoadHooks, each told
    `place_with(device_for)`); returns what was missing/unexpected/mismatched.

    `device_for(name)` gives each parameter's device; `dtype` None keeps the checkpoint's dtype. `private`: read
    safetensors files into fresh memory (plain reads) rather than keep tensors on the file's mapping.
    """
    hooks = checked_hooks(hooks)
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    expected = set(expected_shapes)
    transposed = getattr(model, "_transposed_checkpoint_weights", ())
    info = LoadingInfo()
    loaded: set[str] = set()
    eager = private or any(h.converts_tensors for h in hooks)
    fix = None
    for file in ckpt.files:
        handle = open_checkpoint(file, eager=eager)
        keys = list(handle.keys())
        if fix is None:
            fix = prefix_fixer(model, [rename_key(k) for k in keys], expected)
        for key in keys:
            name = fix(rename_key(key))
            if name not in expected:
                if not _hook_keeps_extra(hooks, model, name, TensorSource(handle, key, file)):
                    info.unexpected_keys.append(key)
                continue
            is_t = any(name.endswith(sfx) for sfx in transposed)
            source = TensorSource(handle, key, file, transposed=is_t)
            want = expected_shapes[name]
            if source.shape != want and not _hook_reshapes(hooks, name):
                info.mismatched_keys.append((name, source.shape, want))
                continue
            device = device_for(name)
            target = _target_dtype(source.dtype, dtype)
            value = _hook_value(hooks, model, name, source, target, device)
            if value is None:
                value = source.get().to(device=device, dtype=target)
            set_tensor(model, name, value)
            loaded.add(name)
        del handle
    if info.mismatched_keys and not ignore_mismatched_sizes:
        lines = "\n".join(f"  {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in info.mismatched_keys)
        hints = "".join(f"{h}\n" for h in dict.fromkeys(_config_hints(model, info.mismatched_keys)))
        raise ValueError(f"size mismatch loading {ckpt.files[0].parent}:\n{lines}\n{hints}The checkpoint does not "
                         "match this config; fix the config, or pass ignore_mismatched_sizes=True to re-initialise "
                         "those weights")
    # A hook may fill companions of a tensor it loaded (a quantizer's scales): only what is still on meta is missing.
    state = model.state_dict(keep_vars=True)
    info.missing_keys = sorted(k for k in expected - loaded if k in state and state[k].is_meta)
    return info


def _config_hints(model: nn.Module, mismatched) -> list[str]:
    """For the mismatched sizes that a config key sets (the model's `_config_dims`: key pattern -> (dim, config key,
    what it counts)), what the checkpoint has and which key to change."""
    hints = []
    for pattern, (dim, key, what) in getattr(model, "_config_dims", {}).items():
        for name, found, want in mismatched:
            if re.search(pattern, name) and len(found) == len(want) and found[dim] != want[dim]:
                hints.append(f"The checkpoint has {found[dim]} {what} where the config has {key}={want[dim]}; set "
                             f"{key} to {found[dim]} in config.json.")
    return hints


def _hook_value(hooks: list[LoadHook], model: nn.Module, name: str, source: TensorSource, dtype, device):
    """The first hook's value for this tensor, or None when no hook takes it."""
    for hook in hooks:
        value = hook.load_tensor(model, name, source, dtype, device)
        if value is not None:
            return value
    return None


def _hook_keeps_extra(hooks: list[LoadHook], model: nn.Module, name: str, source: TensorSource) -> bool:
    return any(h.load_extra_tensor(model, name, source) for h in hooks)


def _hook_reshapes(hooks: list[LoadHook], name: str) -> bool:
    return any(h.accepts_shape_change(name) for h in hooks)


def report(info: LoadingInfo, model_name: str, ignore_unexpected=()) -> str | None:
    """One message describing what did not line up, or None when everything matched."""
    unexpected = [k for k in info.unexpected_keys if not any(re.search(p, k) for p in ignore_unexpected)]
    parts = []
    if info.missing_keys:
        parts.append(f"newly initialised (not in the checkpoint): {', '.join(info.missing_keys)}")
    if unexpected:
        parts.append(f"unused (in the checkpoint, not in the model): {', '.join(unexpected)}")
    if info.mismatched_keys:
        parts.append("re-initialised because of a shape mismatch: " +
                     ", ".join(f"{k} {tuple(a)}->{tuple(b)}" for k, a, b in info.mismatched_keys))
    if not parts:
        return None
    advice = ". Train the model on a downstream task before using newly initialised weights." \
        if info.missing_keys else ""
    return f"Loading {model_name}: " + "; ".join(parts) + advice
