"""`quantization_config` of compressed-tensors checkpoints (quant_method "compressed-tensors", as written by
llm-compressor and compressed-tensors' ModelCompressor): parsed and checked, kept verbatim for saving back."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

CT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.0"  # the compressed-tensors release whose config.json layout loom writes
QUANTIZED_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
_STRATEGIES = ("tensor", "channel", "group", "block")
_FIELD = "quantization_config"


@dataclass(frozen=True)
class WeightScheme:
    """How one group of Linears stores its weights."""

    format: str
    num_bits: int
    type: str  # "int" or "float"
    strategy: str
    symmetric: bool
    group_size: int | None = None
    block: tuple[int, int] | None = None
    act_order: bool = False  # columns assigned to groups by a stored weight_g_idx

    @property
    def packed(self) -> bool:
        return self.format == "pack-quantized"


def _weight_scheme(name: str, group: dict, default_format: str | None) -> WeightScheme | None:
    where = f"{_FIELD}.config_groups.{name}"
    for key in ("input_activations", "output_activations"):
        if group.get(key):
            raise ValueError(f"{where}.{key}: activation quantization is not supported; loom runs weight-only "
                             "quantization. Use a weight-only checkpoint (e.g. W4A16, W8A16)")
    fmt = group.get("format") or default_format
    w = group.get("weights")
    if w is None or fmt == "dense":
        return None
    if fmt not in QUANTIZED_FORMATS:
        raise ValueError(f"{where}.format={fmt!r} is not supported; loom reads {', '.join(QUANTIZED_FORMATS)}")
    kind, bits, strategy = w.get("type", "int"), w.get("num_bits"), w.get("strategy")
    if kind not in ("int", "float") or not isinstance(bits, int) or not (1 <= bits <= 8) or \
            (kind == "float" and bits != 8):
        raise ValueError(f"{where}.weights: type={kind!r} num_bits={bits!r} is not supported; loom reads int 1-8 "
                         "bits and float 8 bits")
    if (kind == "float") != (fmt == "float-quantized"):
        raise ValueError(f"{where}: format {fmt!r} does not hold {kind} weights")
    if strategy not in _STRATEGIES:
        raise ValueError(f"{where}.weights.strategy={strategy!r} is not supported; use one of {_STRATEGIES}")
    if w.get("dynamic"):
        raise ValueError(f"{where}.weights.dynamic=true: weights must be stored quantized (dynamic=false)")
    group_size = w.get("group_size")
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        raise ValueError(f"{where}.weights.group_size={group_size!r} must be a positive integer for strategy 'group'")
    block = w.get("block_structure")
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2):
        raise ValueError(f"{where}.weights.block_structure={block!r} must be [rows, cols] for strategy 'block'")
    actorder = w.get("actorder")
    if actorder not in (None, "static", "weight", "group"):
        raise ValueError(f"{where}.weights.actorder={actorder!r} is not supported")
    return WeightScheme(fmt, bits, kind, strategy, bool(w.get("symmetric", True)), group_size,
                        tuple(block) if block else None, actorder == "group")


def matches(name: str, class_names: tuple[str, ...], target: str) -> bool:
    """compressed-tensors' matching: 're:<regex>' matched at the start of the module name, else an exact module
    name or a class name of the module."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in class_names


class CompressedTensorsConfig:
    """A compressed-tensors `quantization_config` (read from config.json). loom loads its weight-only schemes:
    `pack-quantized` and `int-quantized` integers, `float-quantized` FP8."""

    quant_method = CT_METHOD

    def __init__(self, config_groups: dict | None = None, format: str | None = None, ignore: list | None = None,
                 quantization_status: str = "compressed", **kwargs: Any) -> None:
        self._raw = copy.deepcopy({"config_groups": config_groups, "format": format, "ignore": ignore,
                                   "quantization_status": quantization_status, **kwargs})
        self._raw.pop("quant_method", None)
        if quantization_status != "compressed":
            raise ValueError(f"{_FIELD}.quantization_status={quantization_status!r}: loom loads compressed "
                             "checkpoints only (quantization_status 'compressed')")
        for key in ("sparsity_config", "transform_config"):
            if kwargs.get(key):
                raise ValueError(f"{_FIELD}.{key} is set: sparse and transformed compressed-tensors checkpoints "
                                 "are not supported")
        if kwargs.get("kv_cache_scheme"):
            raise ValueError(f"{_FIELD}.kv_cache_scheme is set: KV-cache quantization is not supported")
        if not isinstance(config_groups, dict) or not config_groups:
            raise ValueError(f"{_FIELD}.config_groups must map group names to schemes, got {config_groups!r}")
        self.ignore = list(ignore or [])
        self.groups: list[tuple[list[str], WeightScheme]] = []
        for name, group in config_groups.items():
            scheme = _weight_scheme(name, group, format)
            if scheme is not None:
                self.groups.append((list(group.get("targets") or []), scheme))

    def scheme_for(self, name: str, class_names: tuple[str, ...]) -> WeightScheme | None:
        """The scheme of the module `name` (None: not quantized); the last matching group wins, as in the writer."""
        if any(matches(name, class_names, t) for t in self.ignore):
            return None
        found = None
        for targets, scheme in self.groups:
            if any(matches(name, class_names, t) for t in targets):
                found = scheme
        return found

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "CompressedTensorsConfig":
        return cls(**config_dict)

    def to_dict(self) -> dict[str, Any]:
        return {**copy.deepcopy(self._raw), "quant_method": self.quant_method}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressedTensorsConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CompressedTensorsConfig({self.to_dict()})"


def weight_only_dict(weights: dict, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config` for one `pack-quantized` weight-only group over every Linear, key for
    key as compressed-tensors' ModelCompressor writes it."""
    return {
        "config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None,
                                      "output_activations": None, "targets": ["Linear"], "weights": weights}},
        "format": "pack-quantized", "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
        "moe_sparsity_config": None, "quant_method": CT_METHOD, "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION,
    }
