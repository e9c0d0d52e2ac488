"""From a quantization config to its backend: the quantizer for `from_pretrained`, and `quantize_` for a model in
memory. The one module that knows every backend; the backends import only the protocol in base.py."""
from __future__ import annotations

from torch import nn

from loom.kernels.memory import gather_small_buffers
from loom.quantization.base import Quantizer, quantized_modules, replace_module
from loom.quantization.bnb import BnbQuantizer
from loom.quantization.compressed_tensors import CompressedTensorsQuantizer
from loom.quantization.config import BitsAndBytesConfig, CompressedTensorsConfig, WeightOnlyConfig, config_from_dict
from loom.quantization.fp8 import FineGrainedFP8Config, FP8Quantizer
from loom.quantization.torchao_config import TorchAoConfig
from loom.quantization.torchao_format import TorchAoQuantizer
from loom.quantization.gptq_awq import AwqQuantizer, GPTQQuantizer
from loom.quantization.gptq_awq_config import AwqConfig, GPTQConfig
from loom.quantization.weight_only import WeightOnlyQuantizer


# what `loom env` and the quantization guide list: format -> (what loads, how it runs, what saves)
CHECKPOINT_FORMATS = {
    "loom int8 / int4 (WeightOnlyConfig)": (
        "quantize while loading or quantize_()", "int8/int4 kernels",
        "compressed-tensors pack-quantized (int8, int4 symmetric or with integer zero points); loom_weight_only "
        "(Conv1D models)"),
    "loom_weight_only (older loom saves)": (
        "int8, int4 (fractional zero points included)", "int8/int4 kernels",
        "compressed-tensors where the layout fits, else loom_weight_only"),
    "compressed-tensors": (
        "pack-quantized and int-quantized 1-8 bit, float-quantized FP8",
        "kernels: int8 symmetric per channel/tensor/group, int4 per group/channel/tensor; dequantized: the rest",
        "pack-quantized group/channel layers that run on the kernels"),
    "GPTQ": ("4-bit and 8-bit, v1/v2 zero points, act-order, sym/asym", "kernels (8-bit with groups: dequantized)",
             "GPTQ, the same tensors"),
    "AWQ": ("4-bit GEMM", "int4 kernel", "AWQ, the same tensors"),
    "FP8 (quant_method fp8)": (
        "float8_e4m3fn with weight_scale_inv per block or tensor, dynamic activations",
        "dequantized at load (or into int8/int4 kernels with a WeightOnlyConfig)",
        "the float weights, no quantization_config (or the WeightOnlyConfig's format)"),
    "torchao (safetensors)": ("Int8WeightOnlyConfig, per row or per tensor; other torchao configs refused by name",
                              "int8 kernel", "compressed-tensors pack-quantized int8 per channel"),
    "bitsandbytes": ("LLM.int8, NF4/FP4 (needs bitsandbytes)", "bitsandbytes", "bitsandbytes"),
    "GGUF (gguf_file=)": ("llama, mistral, qwen2, qwen3: F32/F16/BF16 and the types the gguf package expands",
                          "Q4_0 Linears on the int4 kernel, Q8_0 Linears on the group-wise int8 kernel; dequantized: "
                          "K-quants, Q4_1, Q5_*, quantized embeddings",
                          "compressed-tensors pack-quantized int4 / int8 group 32 (the Q4_0 / Q8_0 layers)"),
}


def get_quantizer(model_config, quantization_config=None) -> Quantizer:
    """The quantizer for a from_pretrained call: the checkpoint's own `quantization_config` (pre-quantized) or the
    one passed by the caller (quantize while loading)."""
    stored = getattr(model_config, "quantization_config", None) if model_config is not None else None
    if stored is not None:
        stored = config_from_dict(stored, "quantization_config in config.json")
        if quantization_config is not None:
            wanted = config_from_dict(quantization_config)
            fp8_on = (WeightOnlyConfig, FineGrainedFP8Config)
            if isinstance(stored, FineGrainedFP8Config) and isinstance(wanted, fp8_on):
                # FP8 weights are dequantized at load anyway (the reference's dequantize=True): a WeightOnlyConfig
                # quantizes them on into loom's int8/int4 Linears
                then = WeightOnlyQuantizer(wanted, False) if isinstance(wanted, WeightOnlyConfig) else None
                return FP8Quantizer(stored, pre_quantized=True, then=then)
            if wanted.to_dict() != stored.to_dict():
                raise ValueError(f"quantization_config: this checkpoint is already quantized ({stored!r}); loom "
                                 "cannot quantize it again. Drop quantization_config= to load it as stored, or "
                                 "load the full-precision checkpoint instead (an FP8 checkpoint takes a "
                                 "WeightOnlyConfig)")
        return quantizer_class(stored)(stored, pre_quantized=True)
    config = config_from_dict(quantization_config)
    return quantizer_class(config)(config, pre_quantized=False)


def quantizer_for_load(request) -> Quantizer | None:
    """The quantization stage of from_pretrained (loom/load_stages.py): the quantizer for a checkpoint that stores a
    quantization_config or a call that passes one, else None."""
    if request.quantization_config is None and getattr(request.config, "quantization_config", None) is None:
        return None
    return get_quantizer(request.config, request.quantization_config)


def quantizer_class(config) -> type[Quantizer]:
    """The backend that serves a quantization config."""
    if isinstance(config, BitsAndBytesConfig):
        if not config.is_quantizable():
            raise ValueError("BitsAndBytesConfig: set load_in_8bit=True or load_in_4bit=True")
        return BnbQuantizer
    if isinstance(config, WeightOnlyConfig):
        return WeightOnlyQuantizer
    for config_class, quantizer in ((CompressedTensorsConfig, CompressedTensorsQuantizer), (GPTQConfig, GPTQQuantizer),
                                    (AwqConfig, AwqQuantizer), (FineGrainedFP8Config, FP8Quantizer),
                                    (TorchAoConfig, TorchAoQuantizer)):
        if isinstance(config, config_class):
            return quantizer
    raise TypeError("quantization_config must be a BitsAndBytesConfig, WeightOnlyConfig, CompressedTensorsConfig, "
                    "GPTQConfig, AwqConfig, FineGrainedFP8Config or TorchAoConfig, "
                    f"got {type(config).__name__}")


def quantize_(model: nn.Module, config) -> nn.Module:
    """Quantize the Linear layers of a model already in memory, in place; returns the model."""
    config = config_from_dict(config, "config")
    already = quantized_modules(model)
    if getattr(model, "_loom_quantizer", None) is not None or already:
        where = f" ({', '.join(already[:3])}{', ...' if len(already) > 3 else ''})" if already else ""
        raise ValueError(f"quantize_: the model is already quantized{where}; quantizing twice loses accuracy. "
                         "Load the full-precision checkpoint and quantize that")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("quantize_: the model has weights on the meta device; load it first, or pass "
                         "quantization_config= to from_pretrained to quantize while loading")
    quantizer = quantizer_class(config)(config, pre_quantized=False)
    quantizer.validate_environment(next((p.device for p in model.parameters()), None))
    quantizer.converted = quantizer.targets(model)
    for name in quantizer.converted:
        linear = model.get_submodule(name)
        quantized = quantizer.quantize_linear(linear)
        # a new module starts in training mode; an eval model's layers must stay in eval (bitsandbytes' CPU 4-bit
        # Linear, for one, takes another kernel path when training)
        quantized.train(linear.training)
        replace_module(model, name, quantized)
    quantizer._attach(model)
    quantizer.finish(model)
    gather_small_buffers(model)  # as the loader does: the new small weights onto huge pages, in module order
    return model
