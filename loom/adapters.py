"""PEFT adapters on loom models: the reference's adapter methods (`load_adapter`, `add_adapter`, `set_adapter`, ...)
as a mixin of PreTrainedModel, and the pieces the Trainer and the Auto classes need to see through a `PeftModel`.

The adapters themselves are peft's modules, injected into the loom model by peft (`inject_adapter_in_model`); an
adapter directory is peft's format (`adapter_config.json` + `adapter_model.safetensors`, keys prefixed with
`base_model.model.`), so adapters move between loom and the reference unchanged. peft is imported only inside the
methods that need it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAVED_PREFIX = "base_model.model."  # what peft's PeftModel.save_pretrained puts before every adapter key


def import_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("adapters need the peft package: pip install 'peft>=0.13'") from None
    return peft


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model inside a peft wrapper (PeftModel, PeftMixedModel), whose forward signature names the real inputs
    and whose loss is the one trained; any other module is returned as is. Never imports peft."""
    peft = sys.modules.get("peft")
    if peft is None:
        return model
    if isinstance(model, peft.PeftModel):
        return model.get_base_model()
    mixed = getattr(peft, "PeftMixedModel", None)
    if mixed is not None and isinstance(model, mixed):
        return model.base_model.model
    return model


def load_with_adapter(load, path, *args, **kwargs):
    """`load(base, ...)` with the adapter of `path` attached when `path` is a directory holding an adapter and no
    model (the base comes from its adapter_config.json, as in the reference); None for any other path."""
    base = adapter_base_model(path)
    if base is None:
        return None
    adapter_name = kwargs.pop("adapter_name", None)
    model = load(base, *args, **kwargs)
    model.load_adapter(path, adapter_name=adapter_name)
    return model


def adapter_base_model(path) -> str | None:
    """For a directory holding an adapter and no model config: the base model its adapter_config.json names."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or (path / "config.json").is_file():
        return None
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path, so the model to attach the "
                         "adapter to is unknown; load the base model yourself and call model.load_adapter(path)")
    return base


def load_adapter_checkpoint_(model: nn.Module, path: Path) -> None:
    """Copy the adapter weights a Trainer checkpoint holds (a PeftModel, or a model holding adapters, saves only
    those) into the live model's adapters, in place, so an optimizer keeps its parameters."""
    from safetensors.torch import load_file

    peft = import_peft()
    name = model.active_adapter if isinstance(model, peft.PeftModel) else model.active_adapters()[0]
    load_adapter_weights_(model, load_file(str(path / ADAPTER_WEIGHTS)), name, f"checkpoint {path}")


def load_adapter_weights_(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str, where: str) -> None:
    """Load adapter tensors as peft saves them into `model`'s adapter `adapter_name` (a PeftModel or a model holding
    adapters); a tensor of the wrong shape (checked before any is copied) or without a place in the model is an
    error naming it."""
    peft = import_peft()
    state = {k.removeprefix(SAVED_PREFIX): v for k, v in tensors.items()}  # keyed as in the unwrapped model
    base = unwrap_peft(model)
    _check_adapter_shapes(base, state, adapter_name, where)
    result = peft.set_peft_model_state_dict(model, tensors if model is not base else state, adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"the adapter in {where} holds weights {type(base).__name__} has no place for "
                         f"({', '.join(result.unexpected_keys[:4])}); load it onto the base model it was trained on, "
                         "with its own adapter_config.json")


class AdapterMixin:
    """The reference's adapter API on a loom model (its PeftAdapterMixin): adapters live inside the model."""

    _hf_peft_config_loaded = False

    def _tuner_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.modules() if isinstance(m, BaseTunerLayer)]

    def _check_adapters_loaded(self) -> None:
        if not self._hf_peft_config_loaded:
            raise ValueError(f"{type(self).__name__} has no adapter; add one with add_adapter(config) or "
                             "load_adapter(path) first")

    def _loaded_names(self, adapter_names: str | list[str]) -> list[str]:
        self._check_adapters_loaded()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"no adapter named {missing}; the loaded ones are {sorted(self.peft_config)}")
        return names

    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        """Inject a fresh (trainable) adapter described by a peft config and make it the active one."""
        peft = import_peft()
        adapter_name = adapter_name or "default"
        if not isinstance(adapter_config, peft.PeftConfig):
            raise TypeError(f"adapter_config must be a peft config (e.g. peft.LoraConfig), got "
                            f"{type(adapter_config).__name__}")
        if self._hf_peft_config_loaded and adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pass another adapter_name")
        adapter_config.base_model_name_or_path = self.__dict__.get("name_or_path") or None
        peft.inject_adapter_in_model(adapter_config, self, adapter_name)
        self._hf_peft_config_loaded = True
        self.set_adapter(adapter_name)

    def load_adapter(self, peft_model_id: str | os.PathLike | None = None, adapter_name: str | None = None,
                     peft_config=None, adapter_state_dict: dict | None = None, is_trainable: bool = False) -> None:
        """Attach an adapter saved by peft (a directory with adapter_config.json and adapter_model.safetensors), or
        one given as `peft_config` + `adapter_state_dict`. The adapter is frozen unless `is_trainable`."""
        peft = import_peft()
        adapter_name = adapter_name or "default"
        if self._hf_peft_config_loaded and adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pass another adapter_name")
        if peft_model_id is None and (peft_config is None or adapter_state_dict is None):
            raise ValueError("load_adapter needs a path (peft_model_id) or both peft_config and adapter_state_dict")
        if peft_config is None:
            peft_config = peft.PeftConfig.from_pretrained(_adapter_dir(peft_model_id))
        if adapter_state_dict is None:
            from safetensors.torch import load_file

            adapter_state_dict = load_file(str(_adapter_dir(peft_model_id) / ADAPTER_WEIGHTS))
        where = str(peft_model_id) if peft_model_id is not None else "adapter_state_dict"
        peft_config.inference_mode = not is_trainable
        try:
            peft.inject_adapter_in_model(peft_config, self, adapter_name)
        except ValueError as e:
            raise ValueError(f"the adapter in {where} does not fit {type(self).__name__}: {e}. Load the base model "
                             f"the adapter was trained on ({peft_config.base_model_name_or_path})") from None
        self._hf_peft_config_loaded = True
        try:
            load_adapter_weights_(self, adapter_state_dict, adapter_name, where)
        except ValueError:
            self.delete_adapter(adapter_name)  # the model is left as it was
            raise
        if not is_trainable:
            for layer in self._tuner_layers():
                layer.requires_grad_(False)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Remove adapters from the model (their layers and their config)."""
        from peft.functional import delete_adapter

        for name in self._loaded_names(adapter_names):
            delete_adapter(self, adapter_name=name, prefix=f"{self.peft_config[name].peft_type.value.lower()}_")
            self.peft_config.pop(name)
        if not self.peft_config:
            del self.peft_config
            self._hf_peft_config_loaded = False

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the active ones (the others stay loaded, unused)."""
        self._loaded_names(adapter_name)
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper

        for module in self.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                module.set_adapter(adapter_name)

    def disable_adapters(self) -> None:
        """Run the base model alone (adapters stay loaded)."""
        self._check_adapters_loaded()
        for layer in self._tuner_layers():
            layer.enable_adapters(False)

    def enable_adapters(self) -> None:
        self._check_adapters_loaded()
        for layer in self._tuner_layers():
            layer.enable_adapters(True)

    def active_adapters(self) -> list[str]:
        self._check_adapters_loaded()
        active = self._tuner_layers()[0].active_adapter
        return [active] if isinstance(active, str) else list(active)

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        """The adapter's tensors, keyed as peft keys them (module path, no adapter name)."""
        self._check_adapters_loaded()
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self, state_dict=state_dict,
                                         adapter_name=adapter_name or self.active_adapters()[0])

    def save_adapter(self, save_directory: str | os.PathLike) -> None:
        """Write the active adapter as peft does (what save_pretrained writes for a model holding adapters)."""
        from safetensors.torch import save_file

        active = self.active_adapters()
        if len(active) > 1:
            raise ValueError(f"{len(active)} adapters are active ({active}); save them one at a time: "
                             "set_adapter(name) then save_pretrained(directory)")
        tensors = {SAVED_PREFIX + k: v.detach().contiguous()
                   for k, v in self.get_adapter_state_dict(active[0]).items()}
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(save_directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        self.peft_config[active[0]].save_pretrained(str(save_directory))

    # -- inputs that require grad (frozen embeddings feeding trainable adapters under reentrant checkpointing) --
    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad, so gradients reach adapters behind frozen layers even
        through reentrant activation checkpointing."""
        self.disable_input_require_grads()

        def require_grad(module, args, output):
            output.requires_grad_(True)

        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(require_grad)

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()


def _adapter_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG}: pass the directory a PeftModel.save_pretrained "
                                "(or a model holding adapters) wrote")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_WEIGHTS}: loom reads adapters saved as safetensors; resave "
                                "the adapter with safe_serialization=True")
    return path


def _check_adapter_shapes(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, where: str) -> None:
    """Each adapter tensor must fit the slot peft will copy it into (peft would fail deep in load_state_dict, with
    the adapter name spliced into the keys); tensors without a slot are reported by the load itself."""
    own = model.state_dict()
    bad = []
    for key, tensor in state.items():
        slot = _slot_for(own, key, adapter_name)
        if slot is not None and own[slot].shape != tensor.shape:
            bad.append(f"{key} {tuple(tensor.shape)} vs the model's {tuple(own[slot].shape)}")
    if bad:
        raise ValueError(f"the adapter in {where} does not match {type(model).__name__}: {'; '.join(bad[:4])}"
                         f"{' ...' if len(bad) > 4 else ''}. Load it onto the base model it was trained on")


def _slot_for(own: dict, key: str, adapter_name: str) -> str | None:
    module, _, leaf = key.rpartition(".")
    for candidate in (f"{module}.{adapter_name}.{leaf}", f"{module}.modules_to_save.{adapter_name}.{leaf}", key,
                      f"{key}.{adapter_name}"):
        if candidate in own:
            return candidate
    return None
