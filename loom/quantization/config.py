"""Quantization configs: `BitsAndBytesConfig` (the reference's names and config.json form) and loom's built-in
`WeightOnlyConfig`, plus turning a config.json dict or a command-line word into one of them."""
from __future__ import annotations

import copy
from typing import Any

import torch

from loom.quantization.ct_config import CT_METHOD, CompressedTensorsConfig
from loom.quantization.fp8 import FP8_METHOD, FineGrainedFP8Config
from loom.quantization.gptq_awq_config import AWQ_METHOD, GPTQ_METHOD, AwqConfig, GPTQConfig
from loom.quantization.torchao_config import TORCHAO_METHOD, TorchAoConfig

BNB_METHOD = "bitsandbytes"
WEIGHT_ONLY_METHOD = "loom_weight_only"
_STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")


def _dtype(value, argument: str, default: torch.dtype, allowed=None) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if (allowed is None or name in allowed) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    elif isinstance(value, torch.dtype):
        return value
    raise ValueError(f"{argument}={value!r} is not a dtype; use a torch.dtype or one of "
                     f"{', '.join(allowed or ('float32', 'bfloat16', 'float16'))}")


class BitsAndBytesConfig:
    """bitsandbytes LLM.int8() (`load_in_8bit`) or 4-bit NF4/FP4 (`load_in_4bit`) quantization.

    Arguments and their config.json form are the reference's; `llm_int8_skip_modules` replaces the default skips
    (lm_head, tied embeddings) when given, as in the reference.
    """

    quant_method = BNB_METHOD

    def __init__(self, load_in_8bit: bool = False, load_in_4bit: bool = False, llm_int8_threshold: float = 6.0,
                 llm_int8_skip_modules: list[str] | None = None, llm_int8_enable_fp32_cpu_offload: bool = False,
                 llm_int8_has_fp16_weight: bool = False, bnb_4bit_compute_dtype=None,
                 bnb_4bit_quant_type: str = "fp4", bnb_4bit_use_double_quant: bool = False,
                 bnb_4bit_quant_storage=None, **kwargs: Any) -> None:
        if load_in_8bit and load_in_4bit:
            raise ValueError("BitsAndBytesConfig: load_in_8bit=True and load_in_4bit=True were both passed; choose one")
        for name, value in (("load_in_8bit", load_in_8bit), ("load_in_4bit", load_in_4bit),
                            ("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload),
                            ("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight),
                            ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)):
            if not isinstance(value, bool):
                raise TypeError(f"BitsAndBytesConfig: {name} must be True or False, got {value!r}")
        if isinstance(llm_int8_threshold, int) and not isinstance(llm_int8_threshold, bool):
            llm_int8_threshold = float(llm_int8_threshold)
        if not isinstance(llm_int8_threshold, float):
            raise TypeError(f"BitsAndBytesConfig: llm_int8_threshold must be a float, got {llm_int8_threshold!r}")
        if llm_int8_skip_modules is not None and not (
                isinstance(llm_int8_skip_modules, list) and all(isinstance(m, str) for m in llm_int8_skip_modules)):
            raise TypeError("BitsAndBytesConfig: llm_int8_skip_modules must be a list of module names, got "
                            f"{llm_int8_skip_modules!r}")
        if bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"BitsAndBytesConfig: bnb_4bit_quant_type={bnb_4bit_quant_type!r} is not a 4-bit type; "
                             "use 'nf4' or 'fp4'")
        self._load_in_8bit = load_in_8bit
        self._load_in_4bit = load_in_4bit
        self.llm_int8_threshold = llm_int8_threshold
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_compute_dtype = _dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", torch.float32)
        self.bnb_4bit_quant_storage = _dtype(bnb_4bit_quant_storage, "bnb_4bit_quant_storage", torch.uint8,
                                             _STORAGE_DTYPES)
        # config.json of pre-quantized checkpoints carries the resolved flags; other unknown keys are ignored
        kwargs.pop("quant_method", None)

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    @load_in_8bit.setter
    def load_in_8bit(self, value: bool) -> None:
        if value and self._load_in_4bit:
            raise ValueError("BitsAndBytesConfig: cannot set load_in_8bit=True while load_in_4bit=True")
        self._load_in_8bit = bool(value)

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @load_in_4bit.setter
    def load_in_4bit(self, value: bool) -> None:
        if value and self._load_in_8bit:
            raise ValueError("BitsAndBytesConfig: cannot set load_in_4bit=True while load_in_8bit=True")
        self._load_in_4bit = bool(value)

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> str | None:
        """'llm_int8', 'nf4', 'fp4', or None when neither flag is set."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "BitsAndBytesConfig":
        known = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """The dict written to config.json: the same keys (private flags included) and values as the reference."""
        out = copy.deepcopy({k: v for k, v in self.__dict__.items()})
        out["quant_method"] = self.quant_method
        out["bnb_4bit_compute_dtype"] = str(self.bnb_4bit_compute_dtype).removeprefix("torch.")
        out["bnb_4bit_quant_storage"] = str(self.bnb_4bit_quant_storage).removeprefix("torch.")
        out["load_in_4bit"] = self.load_in_4bit
        out["load_in_8bit"] = self.load_in_8bit
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitsAndBytesConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BitsAndBytesConfig({self.to_dict()})"


class WeightOnlyConfig:
    """loom's built-in weight-only quantization: int8 per-output-channel symmetric, or int4 group-wise.

    int4 defaults to groups of 32 with a float16 scale and zero point each (asymmetric: ~1/6.4 of fp32 weight
    bytes); `symmetric=True` keeps one float32 scale per group and no zero point (~1/7.5 at group_size=128, less
    accurate). Activations and biases stay in floating point. `modules_to_not_convert` adds to the default skips
    (lm_head and tied embeddings); set `skip_output_embeddings=False` to quantize the output projection too.
    """

    quant_method = WEIGHT_ONLY_METHOD

    def __init__(self, bits: int = 8, group_size: int | None = None,
                 modules_to_not_convert: list[str] | None = None, skip_output_embeddings: bool = True,
                 symmetric: bool | None = None, **kwargs: Any) -> None:
        if bits not in (8, 4):
            raise ValueError(f"WeightOnlyConfig: bits={bits!r} is not supported; use 8 or 4")
        if symmetric is None:
            symmetric = bits == 8
        if not isinstance(symmetric, bool):
            raise TypeError(f"WeightOnlyConfig: symmetric must be True or False, got {symmetric!r}")
        if bits == 8 and not symmetric:
            raise ValueError("WeightOnlyConfig: int8 is symmetric per output channel; symmetric=False is only for "
                             "bits=4")
        if group_size is None:
            group_size = 32 if bits == 4 else -1
        if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
            raise ValueError(f"WeightOnlyConfig: group_size={group_size!r} must be a positive integer (or -1 for one "
                             "group per output channel)")
        if bits == 8 and group_size != -1:
            raise ValueError(f"WeightOnlyConfig: int8 is per-output-channel; group_size={group_size} is only for "
                             "bits=4 (leave it unset or -1)")
        if bits == 4 and group_size != -1 and group_size % 2:
            raise ValueError(f"WeightOnlyConfig: group_size={group_size} must be even for bits=4 (two values per byte)")
        if modules_to_not_convert is not None and not (
                isinstance(modules_to_not_convert, list) and all(isinstance(m, str) for m in modules_to_not_convert)):
            raise TypeError("WeightOnlyConfig: modules_to_not_convert must be a list of module names, got "
                            f"{modules_to_not_convert!r}")
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"WeightOnlyConfig got unknown arguments {sorted(kwargs)}; it takes bits, group_size, "
                            "symmetric, modules_to_not_convert, skip_output_embeddings")
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.modules_to_not_convert = modules_to_not_convert
        self.skip_output_embeddings = skip_output_embeddings

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "WeightOnlyConfig":
        config_dict = dict(config_dict)
        if config_dict.get("bits") == 4:
            # checkpoints written before the key existed hold symmetric int4 (no weight_zero)
            config_dict.setdefault("symmetric", True)
        return cls(**config_dict)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric,
                "modules_to_not_convert": copy.deepcopy(self.modules_to_not_convert),
                "skip_output_embeddings": self.skip_output_embeddings}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightOnlyConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"WeightOnlyConfig({self.to_dict()})"


QuantizationConfig = (BitsAndBytesConfig | WeightOnlyConfig | CompressedTensorsConfig | GPTQConfig | AwqConfig |
                      FineGrainedFP8Config | TorchAoConfig)
_BY_METHOD = {BNB_METHOD: BitsAndBytesConfig, WEIGHT_ONLY_METHOD: WeightOnlyConfig, CT_METHOD: CompressedTensorsConfig,
              GPTQ_METHOD: GPTQConfig, AWQ_METHOD: AwqConfig, FP8_METHOD: FineGrainedFP8Config,
              TORCHAO_METHOD: TorchAoConfig}


def config_from_dict(config: dict[str, Any] | QuantizationConfig, argument: str = "quantization_config"):
    """A config object from a config object or a dict with a `quant_method` (as read from config.json)."""
    if isinstance(config, tuple(_BY_METHOD.values())):
        return config
    if not isinstance(config, dict):
        raise TypeError(f"{argument} must be one of {', '.join(c.__name__ for c in _BY_METHOD.values())} or a dict, "
                        f"got "
                        f"{type(config).__name__}")
    method = config.get("quant_method")
    if method is None and ("load_in_8bit" in config or "load_in_4bit" in config):
        method = BNB_METHOD  # old bitsandbytes checkpoints wrote no quant_method
    cls = _BY_METHOD.get(method)
    if cls is None:
        raise ValueError(f"{argument} has quant_method={method!r}, which loom does not support; supported methods: "
                         f"{', '.join(repr(m) for m in _BY_METHOD)}")
    return cls.from_dict({k: v for k, v in config.items() if k != "quant_method"})


_FLAGS = {
    "int8": lambda: WeightOnlyConfig(bits=8),
    "int4": lambda: WeightOnlyConfig(bits=4),
    "bnb-8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "bnb-4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
}


def config_from_flag(name: str) -> QuantizationConfig:
    """The config behind a command-line `--quantize` word: int8, int4, bnb-8bit or bnb-4bit (NF4)."""
    factory = _FLAGS.get(str(name).strip().lower())
    if factory is None:
        raise ValueError(f"--quantize {name!r} is not a quantization; use one of {', '.join(_FLAGS)}")
    return factory()
