"""Quantization: bitsandbytes 8-bit/4-bit, loom's built-in int8/int4 weight-only Linears, and pre-quantized
compressed-tensors, GPTQ, AWQ, FP8 block-scale and torchao int8 checkpoints.

Use `from_pretrained(..., quantization_config=BitsAndBytesConfig(...) | WeightOnlyConfig(...))` to quantize while
loading, `quantize_(model, config)` for a model in memory; `save_pretrained` writes the quantized weights and
`quantization_config`, and `from_pretrained` reloads them as stored. bitsandbytes is imported only when used.
`set_activation_bits(model, 8)` switches a loaded model's int4 Linears to 8-bit activations (faster decode; a runtime
choice that is not saved).
"""
from loom.quantization.activations import activation_bits, set_activation_bits
from loom.quantization.base import Quantizer
from loom.quantization.config import (AwqConfig, BitsAndBytesConfig, CompressedTensorsConfig, FineGrainedFP8Config,
                                      GPTQConfig, TorchAoConfig, WeightOnlyConfig, config_from_dict,
                                      config_from_flag)
from loom.quantization.registry import get_quantizer, quantize_

__all__ = ["AwqConfig", "BitsAndBytesConfig", "CompressedTensorsConfig", "FineGrainedFP8Config", "GPTQConfig",
           "TorchAoConfig", "WeightOnlyConfig", "Quantizer", "config_from_dict", "config_from_flag", "get_quantizer",
           "quantize_", "activation_bits", "set_activation_bits"]
