"""`quantization_config` of torchao checkpoints (quant_method "torchao", the reference's TorchAoConfig): checked
for the one layout loom reads (see torchao_format.py), kept verbatim."""
from __future__ import annotations

from loom.quantization.gptq_awq_config import _StoredConfig

TORCHAO_METHOD = "torchao"
_FIELD = "quantization_config"
_READ = ("PerRow", "PerTensor")


class TorchAoConfig(_StoredConfig):
    """A torchao `quantization_config` as the reference writes it (`quant_type` is torchao's serialized config);
    loom reads `{"default": Int8WeightOnlyConfig}` with per-row or per-tensor granularity."""

    quant_method = TORCHAO_METHOD

    def __init__(self, quant_type=None, modules_to_not_convert: list | None = None,
                 include_input_output_embeddings: bool = False, **kwargs) -> None:
        super().__init__(quant_type=quant_type, include_input_output_embeddings=include_input_output_embeddings,
                         **({"modules_to_not_convert": modules_to_not_convert} if modules_to_not_convert else {}),
                         **kwargs)
        default = quant_type.get("default") if isinstance(quant_type, dict) and len(quant_type) == 1 else None
        kind = default.get("_type") if isinstance(default, dict) else None
        if kind != "Int8WeightOnlyConfig":
            found = kind or (quant_type if isinstance(quant_type, str) else
                             "/".join(sorted(quant_type)) if isinstance(quant_type, dict) else repr(quant_type))
            raise ValueError(f"{_FIELD}.quant_type={found!r} is not supported: loom reads torchao checkpoints of "
                             "Int8WeightOnlyConfig (one config for every Linear). Load the full-precision checkpoint "
                             "and quantize it with WeightOnlyConfig(bits=4 or 8)")
        data = default.get("_data") or {}
        granularity = (data.get("granularity") or {"_type": "PerRow"}).get("_type")
        if data.get("group_size") is not None or granularity not in _READ:
            raise ValueError(f"{_FIELD}.quant_type Int8WeightOnlyConfig with granularity {granularity!r} "
                             f"(group_size={data.get('group_size')!r}) is not supported; loom reads per-row and "
                             "per-tensor int8 (loom's int8 kernel has one scale per output row)")
        if include_input_output_embeddings:
            raise ValueError(f"{_FIELD}.include_input_output_embeddings=true: torchao-quantized embedding tables are "
                             "not supported; load the full-precision checkpoint")
