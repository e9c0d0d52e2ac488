"""`quantization_config` of GPTQ (AutoGPTQ, GPTQModel, optimum) and AWQ (AutoAWQ) checkpoints, with the reference's
class names; the dict read from config.json is kept verbatim so that a saved model writes it back unchanged."""
from __future__ import annotations

import copy
from typing import Any

GPTQ_METHOD = "gptq"
AWQ_METHOD = "awq"
GPTQ_FORMATS = ("gptq", "gptq_v2")


class _StoredConfig:
    quant_method = ""

    def __init__(self, **fields: Any) -> None:
        fields.pop("quant_method", None)
        self._raw = copy.deepcopy(fields)
        modules = fields.get("modules_to_not_convert")
        if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
            raise TypeError(f"{type(self).__name__}: modules_to_not_convert must be a list of module names, got "
                            f"{modules!r}")
        self.modules_to_not_convert = list(modules or [])

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]):
        return cls(**config_dict)

    def to_dict(self) -> dict[str, Any]:
        return {**copy.deepcopy(self._raw), "quant_method": self.quant_method}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


def _group_size(cls: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (value <= 0 and value != -1):
        raise ValueError(f"{cls}: group_size={value!r} must be a positive integer or -1 (one group per row)")
    return value


class GPTQConfig(_StoredConfig):
    """A GPTQ checkpoint: `bits` (4 or 8) integers packed into int32 `qweight` (in/(32/bits), out), per-group
    `scales` and packed `qzeros`, and `g_idx` (the group of each input; act-order with `desc_act`).
    `checkpoint_format` "gptq" stores each zero point minus one (v1), "gptq_v2" stores it as is."""

    quant_method = GPTQ_METHOD

    def __init__(self, bits: int = 4, group_size: int = 128, desc_act: bool = False, sym: bool = True,
                 checkpoint_format: str | None = None, **kwargs: Any) -> None:
        super().__init__(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                         **({"checkpoint_format": checkpoint_format} if checkpoint_format is not None else {}),
                         **kwargs)
        if bits not in (4, 8):
            raise ValueError(f"GPTQConfig: bits={bits!r} is not supported; loom loads 4- and 8-bit GPTQ checkpoints")
        self.bits, self.group_size = bits, _group_size("GPTQConfig", group_size)
        self.desc_act, self.sym = bool(desc_act), bool(sym)
        fmt = checkpoint_format or kwargs.get("format") or "gptq"
        if fmt not in GPTQ_FORMATS:
            raise ValueError(f"GPTQConfig: checkpoint_format={fmt!r} is not supported; loom reads "
                             f"{', '.join(GPTQ_FORMATS)} (repack other formats with the tool that wrote them)")
        self.checkpoint_format = fmt

    @property
    def zero_offset(self) -> int:
        """What readers add to a stored zero point: v1 stores zero - 1."""
        return 1 if self.checkpoint_format == "gptq" else 0


class AwqConfig(_StoredConfig):
    """An AWQ checkpoint (AutoAWQ's GEMM layout): 4-bit `qweight` (in, out/8) and `qzeros` (in/group, out/8)
    packed along the outputs in AWQ's interleaved nibble order, float16 `scales` (in/group, out)."""

    quant_method = AWQ_METHOD

    def __init__(self, bits: int = 4, group_size: int = 128, zero_point: bool = True, version: str = "gemm",
                 **kwargs: Any) -> None:
        super().__init__(bits=bits, group_size=group_size, zero_point=zero_point, version=version, **kwargs)
        if bits != 4:
            raise ValueError(f"AwqConfig: bits={bits!r} is not supported; AWQ checkpoints are 4-bit")
        if str(version).lower() != "gemm":
            raise ValueError(f"AwqConfig: version={version!r} is not supported; loom reads AutoAWQ's 'gemm' packing")
        if not zero_point:
            raise ValueError("AwqConfig: zero_point=false is not supported; loom reads AWQ with zero points")
        self.bits, self.group_size = bits, _group_size("AwqConfig", group_size)
