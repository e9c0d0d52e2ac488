"""The shared loader hook of pre-quantized formats (compressed-tensors, GPTQ, AWQ): each targeted Linear's stored
tensors (packed integers, scales, zero points, group indices) are collected as they stream in, and the module is
built from them as soon as the last one arrives, so the model never holds a format's tensors and loom's at once."""
from __future__ import annotations

import torch
from torch import nn

from loom.quantization.base import Quantizer


def _move_loaded_(module: nn.Module, device) -> None:
    """Move a module's loaded tensors to `device`, leaving those still to stream in (on meta) alone."""
    for slots in (module._parameters, module._buffers):
        for key, t in slots.items():
            if t is not None and not t.is_meta and t.device != torch.device(device):
                moved = t.data.to(device)
                slots[key] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved


def mismatch(name: str, message: str) -> ValueError:
    """The error for a stored tensor that contradicts the checkpoint's quantization_config."""
    return ValueError(f"{name}: {message}; the checkpoint does not match its quantization_config")


class CollectingQuantizer(Quantizer):
    """Subclasses set `tensor_names` (the attributes a format stores per Linear) and define `required(module)` and
    `assemble(model, module, tensors)`."""

    tensor_names: tuple[str, ...] = ()
    format_name = ""

    def __init__(self, config, pre_quantized: bool) -> None:
        if not pre_quantized:
            raise ValueError(f"{type(config).__name__} describes a checkpoint that is already quantized; loom does not "
                             "quantize into it while loading. Use WeightOnlyConfig to quantize a full-precision model")
        super().__init__(config, pre_quantized)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self.assembled: set[str] = set()
        self._device_for = None
        self.dequantized: list[str] = []  # Linears left in float, their weights expanded at load

    def required(self, module: str) -> tuple[str, ...]:
        raise NotImplementedError

    def assemble(self, model: nn.Module, module: str, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def place_with(self, device_for) -> None:
        self._device_for = device_for

    def _owned(self, name: str) -> tuple[str, str] | None:
        module, _, attr = name.rpartition(".")
        return (module, attr) if attr in self.tensor_names and module in self._converted_set() else None

    def accepts_shape_change(self, name: str) -> bool:
        return self._owned(name) is not None

    def load_tensor(self, model, name, source, dtype, device):
        owned = self._owned(name)
        if owned is None:
            return None
        self._collect(model, *owned, source)
        return getattr(model.get_submodule(owned[0]), owned[1])

    def load_extra_tensor(self, model, name, source) -> bool:
        owned = self._owned(name)
        if owned is not None:
            self._collect(model, *owned, source)
        return owned is not None

    def _collect(self, model, module: str, attr: str, source) -> None:
        if module in self.assembled:
            self.late_tensor(model, module, attr, source.get())
            return
        pending = self._pending.setdefault(module, {})
        pending[attr] = source.get()
        if all(k in pending for k in self.required(module)):
            self.assemble(model, module, self._pending.pop(module))
            self.assembled.add(module)
            if self._device_for is not None:  # built from CPU reads: to where the loader puts this module
                _move_loaded_(model.get_submodule(module), self._device_for(f"{module}.weight"))

    def late_tensor(self, model, module: str, attr: str, tensor: torch.Tensor) -> None:
        raise ValueError(f"{module}.{attr} appears twice in the checkpoint")

    def not_saved(self) -> list[str]:
        """Layers save_pretrained cannot write back in the checkpoint's format."""
        return self.dequantized

    def is_serializable(self) -> bool:
        return not self.not_saved()

    def why_not_serializable(self) -> str:
        names = self.not_saved()
        return (f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''} "
                f"{'were' if len(names) > 1 else 'was'} dequantized at load or stored in a layout loom does not "
                f"write, so the {self.format_name} integers cannot be saved back; keep the original checkpoint files")

    def finish(self, model: nn.Module) -> None:
        missing = [f"{m}.{k}" for m, t in self._pending.items() for k in self.required(m) if k not in t]
        missing += [f"{m}.{self.required(m)[0]}" for m in self.converted
                    if m not in self.assembled and m not in self._pending]
        if missing:
            raise ValueError(f"the {self.format_name} checkpoint lacks {', '.join(missing[:6])}"
                             f"{', ...' if len(missing) > 6 else ''}, which its quantization_config requires; "
                             "re-download or re-export the checkpoint")
        super().finish(model)
        for name in self.converted:
            module = model.get_submodule(name)
            if hasattr(module, "choose_kernel"):
                module.choose_kernel()
