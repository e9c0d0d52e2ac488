"""The bitsandbytes quantizer: LLM.int8() and 4-bit NF4/FP4 with bitsandbytes' own modules, so checkpoints and
outputs match the reference's. bitsandbytes is imported only here, when a BitsAndBytesConfig is used.

Checkpoint layout (the reference's): 8-bit `weight` (int8), `SCB` (per-row absmax) and `weight_format`; 4-bit
`weight` (packed bytes) plus `weight.absmax`, `weight.quant_map`, `weight.nested_*` and
`weight.quant_state.bitsandbytes__<type>`. Those companions have no slot in the meta model, so they arrive through
`load_extra_tensor` and the weights are assembled in `finish`.
"""
from __future__ import annotations

from importlib import metadata

import torch
from torch import nn

from loom.kernels.memory import release_freed_memory
from loom.quantization.base import Quantizer, default_skips
from loom.quantization.config import BitsAndBytesConfig
from loom.utils import require

MIN_VERSION = (0, 43, 0)


def _bnb():
    return require("bitsandbytes", "BitsAndBytesConfig quantization")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class BnbQuantizer(Quantizer):
    method = "bitsandbytes"
    config: BitsAndBytesConfig

    def __init__(self, config: BitsAndBytesConfig, pre_quantized: bool) -> None:
        super().__init__(config, pre_quantized)
        self.eight_bit = config.load_in_8bit
        self._extras: dict[str, dict[str, torch.Tensor]] = {}
        self._checked_devices: set[str] = set()

    # -- environment -------------------------------------------------------------------------------------------
    def validate_environment(self, device: torch.device | None = None) -> None:
        bnb = _bnb()
        try:
            version = metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:
            version = getattr(bnb, "__version__", "0")
        if _version_tuple(version) < MIN_VERSION:
            wanted = ".".join(map(str, MIN_VERSION))
            raise ImportError(f"BitsAndBytesConfig needs bitsandbytes>={wanted} (CPU support and serialisation), "
                              f"found {version}; run `pip install -U 'bitsandbytes>={wanted}'`")
        if device is None or str(device) in self._checked_devices:
            return
        supported = getattr(bnb, "supported_torch_devices", None)
        kind = torch.device(device).type
        if kind != "meta" and supported is not None and kind not in supported:
            raise RuntimeError(f"bitsandbytes {version} has no backend for device '{kind}' (it supports "
                               f"{', '.join(sorted(supported))}); load on one of those with device_map=..., or use "
                               "loom's WeightOnlyConfig, which runs everywhere")
        self._checked_devices.add(str(device))

    # -- targeting ---------------------------------------------------------------------------------------------
    def modules_to_not_convert(self, model: nn.Module) -> list[str]:
        # mixture-of-experts blocks say whether their experts stay in full precision (loom.models.moe.SparseMoE)
        experts = [f"{name}.experts" for name, m in model.named_modules()
                   if getattr(m, "bnb_keeps_experts_full_precision", False)]
        # as in the reference: an explicit list replaces the default skips
        if self.config.llm_int8_skip_modules is not None:
            return list(self.config.llm_int8_skip_modules) + experts
        return default_skips(model) + experts

    def make_module(self, linear: nn.Linear) -> nn.Module:
        bnb = _bnb()
        cfg = self.config
        with torch.device("meta"):
            if self.eight_bit:
                new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                          has_fp16_weights=cfg.llm_int8_has_fp16_weight,
                                          threshold=cfg.llm_int8_threshold)
                if self.pre_quantized:
                    new.weight.data = new.weight.data.to(torch.int8)
            else:
                new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                        cfg.bnb_4bit_compute_dtype, compress_statistics=cfg.bnb_4bit_use_double_quant,
                                        quant_type=cfg.bnb_4bit_quant_type, quant_storage=cfg.bnb_4bit_quant_storage)
                if self.pre_quantized:
                    new.weight.data = new.weight.data.to(cfg.bnb_4bit_quant_storage)
        new.requires_grad_(False)
        return new

    # -- quantizing one weight ---------------------------------------------------------------------------------
    def _quantized_param(self, module: nn.Module, value: torch.Tensor, device) -> nn.Parameter:
        bnb = _bnb()
        if self.eight_bit:
            kwargs = dict(module.weight.__dict__)
            kwargs.pop("SCB", None)
            return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs).to(device)
        return bnb.nn.Params4bit(value, requires_grad=False, **module.weight.__dict__).to(device)

    def load_tensor(self, model, name, source, dtype, device):
        if not self.owns(name):
            return None
        self.validate_environment(device)
        module = model.get_submodule(name.rpartition(".")[0])
        if self.pre_quantized:
            return nn.Parameter(source.get().to(device), requires_grad=False)
        value = source.get()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return self._quantized_param(module, value.to(device), device)

    def load_extra_tensor(self, model, name, source) -> bool:
        if not self.pre_quantized:
            return False
        module_name, attr = _split_companion(name)
        if module_name is None or module_name not in self._converted_set():
            return False
        self._extras.setdefault(module_name, {})[attr] = source.get()
        return True

    def finish(self, model: nn.Module) -> None:
        super().finish(model)
        if self.pre_quantized:
            for name in self.converted:
                self._assemble(name, model.get_submodule(name))
            self._extras.clear()
        model.is_loaded_in_8bit = self.eight_bit
        model.is_loaded_in_4bit = not self.eight_bit
        release_freed_memory()

    def _assemble(self, name: str, module: nn.Module) -> None:
        bnb = _bnb()
        extras = self._extras.get(name, {})
        weight = module.weight
        if weight.is_meta:
            return  # reported as missing by the loader
        device = weight.device
        if self.eight_bit:
            scb = extras.get("SCB")
            fmt = extras.get("weight_format")
            if scb is None:
                raise ValueError(f"{name}.SCB is missing from the checkpoint: an 8-bit bitsandbytes weight needs its "
                                 "row scales; re-save the model")
            if fmt is not None and int(fmt.item()) != 0:
                raise ValueError(f"{name}.weight_format={int(fmt.item())}: only the row-major format (0) is supported")
            # a freshly quantized Int8Params holds the int8 rows both as data and as CB
            module.weight = bnb.nn.Int8Params(weight.data, requires_grad=False, has_fp16_weights=False,
                                              CB=weight.data, SCB=scb.to(device))
            return
        stats = {f"weight.{k}": v for k, v in extras.items()}
        if not stats:
            raise ValueError(f"{name}: the checkpoint holds no 4-bit quant state (weight.absmax, weight.quant_map, "
                             "weight.quant_state.*); it does not match its quantization_config")
        module.weight = bnb.nn.Params4bit.from_prequantized(data=weight.data, quantized_stats=stats,
                                                            requires_grad=False, device=device, module=module)

    # -- quantize_ on a loaded model ---------------------------------------------------------------------------
    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        device = linear.weight.device
        self.validate_environment(device)
        new = self.make_module(linear)
        new.weight = self._quantized_param(new, linear.weight.detach().clone(), device)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return new


def _split_companion(name: str) -> tuple[str | None, str]:
    """'a.b.SCB' -> ('a.b', 'SCB'); 'a.b.weight.absmax' -> ('a.b', 'absmax'); other names -> (None, '')."""
    if ".weight." in name:
        module, _, attr = name.partition(".weight.")
        return module, attr
    module, _, attr = name.rpartition(".")
    if attr in ("SCB", "weight_format"):
        return module, attr
    return None, ""
