"""The quantizer protocol shared by every backend: module targeting and the loader hook. Which backend serves a
config is decided in registry.py, so this file imports no backend and every backend can import it.

A quantizer is a `LoadHook` (loom/load_hooks.py): `prepare_model` swaps the targeted `nn.Linear`s of the meta
model for quantized modules, `load_tensor` quantizes each weight as it streams in (or takes a pre-quantized one as
stored), `load_extra_tensor` keeps companion tensors (scales, quant states) that have no slot in the meta model,
and `finish` assembles whatever needed several tensors. Once attached to a model (`_attach`), save_pretrained writes
the model through its `checkpoint_tensors` and `saved_config`. `quantize_linear` converts one loaded Linear, for
`quantize_` (registry.py) on a model already in memory.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from loom.kernels import is_plain_linear
from loom.load_hooks import LoadHook, attach_save_hook


def default_skips(model: nn.Module) -> list[str]:
    """Modules the reference leaves in full precision: the output embeddings, tied weights, the last parameter's."""
    names: set[str] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    for target, source in getattr(model, "_tied_weights_keys", {}).items():
        names.update({target, source})
    params = list(model.named_parameters())
    if params:
        names.add(params[-1][0])
    return sorted({n.removesuffix(".weight") for n in names})


def is_skipped(name: str, patterns: list[str]) -> bool:
    """True when a pattern names this module: a prefix ending at a module boundary, a regex, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for pattern in patterns:
        try:
            if re.match(rf"(?:{pattern}){boundary}", name):
                return True
        except re.error:
            pass
        if name.endswith(pattern):
            return True
    return False


def target_linears(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the plain `nn.Linear` modules (loom's kernel Linear included) to convert; other subclasses and
    skipped names are left alone."""
    return [name for name, m in model.named_modules() if is_plain_linear(m) and not is_skipped(name, skip)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of modules that already hold quantized weights (loom's or bitsandbytes')."""
    return [n for n, m in model.named_modules() if getattr(m, "_loom_quantized", False)
            or type(m).__name__ in ("Linear8bitLt", "Linear4bit", "LinearNF4", "LinearFP4")]


class Quantizer(LoadHook):
    """Base of every backend; subclasses define `make_module`, `load_tensor`, `quantize_linear`."""

    method: str = ""
    # the loader reads tensors into fresh memory instead of mapping the file: each fp32 weight is dropped once
    # quantized, so peak memory stays near the quantized size plus one tensor
    converts_tensors = True

    def __init__(self, config, pre_quantized: bool) -> None:
        self.config = config
        self.pre_quantized = pre_quantized
        self.converted: list[str] = []
        self._transposed: tuple[str, ...] = ()

    # -- environment -------------------------------------------------------------------------------------------
    def validate_environment(self, device: torch.device | None = None) -> None:
        """Raise a clear error when a package, version or device needed by this backend is missing."""

    # -- targeting ---------------------------------------------------------------------------------------------
    def modules_to_not_convert(self, model: nn.Module) -> list[str]:
        return default_skips(model)

    def targets(self, model: nn.Module) -> list[str]:
        return target_linears(model, self.modules_to_not_convert(model))

    # -- loader hook -------------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Swap the targeted Linears of the (meta) model for quantized modules and attach this quantizer."""
        self.validate_environment()
        self.converted = self.targets(model)
        for name in self.converted:
            replace_module(model, name, self.make_module(model.get_submodule(name)))
        self._attach(model)
        if self.pre_quantized:
            # quantized weights are stored in the Linear layout even for models whose checkpoints transpose (GPT-2)
            model._transposed_checkpoint_weights = self._transposed

    def _attach(self, model: nn.Module) -> None:
        owned = {f"{n}.weight" for n in self.converted}
        cls_transposed = getattr(type(model), "_transposed_checkpoint_weights", ())
        # Only float weights are flipped on save/load: name them one by one so quantized ones are left alone.
        self._transposed = tuple(k for k in model.state_dict(keep_vars=True)
                                 if k not in owned and any(k.endswith(s) for s in cls_transposed))
        model._loom_quantizer = self
        attach_save_hook(model, self)
        if getattr(model, "config", None) is not None:
            model.config.quantization_config = self.config

    def owns(self, name: str) -> bool:
        module, _, attr = name.rpartition(".")
        return attr == "weight" and module in self._converted_set()

    def _converted_set(self) -> set[str]:
        if getattr(self, "_cset", None) is None or len(self._cset) != len(self.converted):
            self._cset = set(self.converted)
        return self._cset

    def accepts_shape_change(self, name: str) -> bool:
        return self.owns(name)

    def load_extra_tensor(self, model: nn.Module, name: str, source) -> bool:
        return False

    def finish(self, model: nn.Module) -> None:
        model._transposed_checkpoint_weights = self._transposed

    # -- saving (is_serializable, why_not_serializable, checkpoint_tensors: LoadHook's defaults; a backend that
    # stores another layout than it runs overrides checkpoint_tensors) ----------------------------------------------
    def saved_config(self, model: nn.Module):
        """The quantization_config save_pretrained writes next to `checkpoint_tensors`."""
        return self.config

    def saved_config_fields(self, model: nn.Module) -> dict:
        return {"quantization_config": self.saved_config(model)}

    # -- backend API -------------------------------------------------------------------------------------------
    def make_module(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError
