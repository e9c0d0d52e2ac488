"""The loader's extension point: every checkpoint format and load-time transform is a `LoadHook`.

`from_pretrained` (loom/load_stages.py) runs in named stages; a hook takes part in the ones it overrides and the
defaults here do nothing, so a new format is one subclass, registered with `register_load_hook`:

    stage                   hook method                                         built-in users
    select                  for_load(request) -> hook | None   (classmethod)    every format
    config / dtype          configure(config, dtype) -> dtype                   GGUF (float32 unless asked)
    files                   checkpoint_files(request) -> CheckpointFiles | None  GGUF (one .gguf file)
    before weights          prepare_model(model), place_with(device_for)        quantizers swap Linears on the meta
                                                                                model; tensor parallel plans shards
    streaming, per tensor   load_tensor(model, name, source, dtype, device)     quantize / repack / slice a tensor
                            load_extra_tensor(model, name, source) -> bool      keep a key the model has no slot for
                            accepts_shape_change(name) -> bool                  stored shape != the model's
    after weights           finish(model)                                       assemble, check, apply_tp
    saving                  is_serializable(), why_not_serializable(), checkpoint_tensors(model, tensors),
                            saved_config_fields(model)

A hook whose format changes what `save_pretrained` writes sets `transforms_saves = True` (or attaches itself with
`attach_save_hook`, as a quantizer does once it has converted something); the model keeps it and calls its saving
methods on every save. This module imports nothing else from loom, so formats anywhere can subclass it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn


@dataclass
class LoadRequest:
    """One `from_pretrained` call, as the stages and the hooks see it; `config` and `dtype` are filled in by the
    config and dtype stages."""

    path: Any
    config: Any = None
    dtype: Any = None
    device_map: Any = None
    max_memory: dict | None = None
    offload_folder: Any = None
    quantization_config: Any = None
    tp_plan: Any = None
    device_mesh: Any = None
    gguf_file: Any = None
    variant: str | None = None
    use_safetensors: bool | None = None
    ignore_mismatched_sizes: bool = False
    attn_implementation: str | None = None
    disable_mmap: bool | None = None
    hub: dict = field(default_factory=dict)


class LoadHook:
    """Base class of every loader hook. Override the stages the format takes part in; see the module docstring."""

    # read safetensors with plain reads instead of a file mapping: a hook that converts every tensor it takes (a
    # quantizer) must not leave the file's full-precision pages resident
    converts_tensors: ClassVar[bool] = False
    # the model keeps this hook after loading and save_pretrained calls its saving methods
    transforms_saves: ClassVar[bool] = False

    # -- select ------------------------------------------------------------------------------------------------
    @classmethod
    def for_load(cls, request: LoadRequest) -> "LoadHook | None":
        """The hook for this load when the format applies to it (by the config, the files or an argument), else
        None."""
        return None

    # -- config, dtype, files ----------------------------------------------------------------------------------
    def configure(self, config, dtype: torch.dtype | None) -> torch.dtype | None:
        """Adjust the config in place before the model is built; return the dtype to load in (None: the
        checkpoint's own dtypes)."""
        return dtype

    def checkpoint_files(self, request: LoadRequest):
        """The files to stream (a loom.loading.CheckpointFiles) when this format stores its weights somewhere other
        than model.safetensors / pytorch_model.bin; None to let the loader find them."""
        return None

    # -- before weights ----------------------------------------------------------------------------------------
    def place_with(self, device_for: Callable[[str], torch.device]) -> None:
        """Where each tensor goes (device_for(name)), for hooks that build modules from tensors the model has no
        slot for."""

    def prepare_model(self, model: nn.Module) -> None:
        """Change the model built on the meta device before any weight is read (swap modules, plan shards)."""

    # -- streaming ---------------------------------------------------------------------------------------------
    def accepts_shape_change(self, name: str) -> bool:
        """True when this hook takes `name` although its stored shape differs from the model's (packed weights)."""
        return False

    def load_tensor(self, model: nn.Module, name: str, source, dtype: torch.dtype | None, device):
        """The value to place at model key `name` (a tensor or Parameter), read from `source` (a TensorSource:
        .shape, .dtype, .get(), .slice(dim, start, stop)) into `dtype` on `device`; None when the tensor is not this
        hook's (the next hook, then a plain read, takes it)."""
        return None

    def load_extra_tensor(self, model: nn.Module, name: str, source) -> bool:
        """A checkpoint key the model has no slot for (a quantizer's scales): True when this hook keeps it, False to
        report it as unused."""
        return False

    # -- after weights -----------------------------------------------------------------------------------------
    def finish(self, model: nn.Module) -> None:
        """After every tensor is in place, weights are tied and missing ones initialised."""

    # -- saving ------------------------------------------------------------------------------------------------
    def is_serializable(self) -> bool:
        """False when save_pretrained must refuse the model (say why in why_not_serializable)."""
        return True

    def why_not_serializable(self) -> str:
        return ""

    def checkpoint_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors save_pretrained writes, from the model's own."""
        return tensors

    def saved_config_fields(self, model: nn.Module) -> dict[str, Any]:
        """config.json fields this format writes (set on the config for the save only)."""
        return {}


_REGISTERED: list[type[LoadHook]] = []


def register_load_hook(hook_class: type[LoadHook]) -> type[LoadHook]:
    """Make `from_pretrained` ask `hook_class.for_load(request)` on every load (usable as a class decorator).
    Registered hooks run after the built-in ones (GGUF, quantization, tensor parallel), in registration order."""
    if not (isinstance(hook_class, type) and issubclass(hook_class, LoadHook)):
        raise TypeError(f"register_load_hook takes a LoadHook subclass, got {hook_class!r}; subclass "
                        "loom.load_hooks.LoadHook and override the stages your format takes part in")
    if hook_class not in _REGISTERED:
        _REGISTERED.append(hook_class)
    return hook_class


def unregister_load_hook(hook_class: type[LoadHook]) -> None:
    """Undo `register_load_hook` (a no-op for a class that is not registered)."""
    if hook_class in _REGISTERED:
        _REGISTERED.remove(hook_class)


def registered_load_hooks() -> tuple[type[LoadHook], ...]:
    return tuple(_REGISTERED)


def checked_hooks(hooks) -> list[LoadHook]:
    """`hooks` as a list, each checked to be a LoadHook (an object with look-alike methods is refused by name)."""
    hooks = list(hooks)
    for hook in hooks:
        if not isinstance(hook, LoadHook):
            raise TypeError(f"{type(hook).__name__} is not a loom.load_hooks.LoadHook; loader hooks subclass it and "
                            "override the stages they take part in")
    return hooks


def attach_save_hook(model: nn.Module, hook: LoadHook) -> None:
    """Keep `hook` on `model`, so save_pretrained writes the model in the hook's format."""
    kept = [h for h in getattr(model, "_loom_save_hooks", ()) if h is not hook]
    model._loom_save_hooks = (*kept, hook)


def save_hooks(model: nn.Module) -> tuple[LoadHook, ...]:
    """The hooks whose formats save_pretrained writes this model in, in the order they were attached."""
    return tuple(getattr(model, "_loom_save_hooks", ()))
