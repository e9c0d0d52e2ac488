"""FP8 block-scale checkpoints (`quant_method: "fp8"`, as DeepSeek-V3 and the Qwen3-*-FP8 releases ship): each
quantized Linear stores a float8_e4m3fn `weight` and a float32 `weight_scale_inv` with one value per block of
`weight_block_size` = [rows, cols] (one per tensor without it); w = float(weight) * weight_scale_inv of its block. A
grid that does not divide the weight has partial last blocks: scale shape (ceil(out / rows), ceil(in / cols)).

loom has no fp8 kernel, so, like the reference on a CPU, each weight is dequantized as it streams in (one tensor at a
time in float32, then the model's dtype) into a plain float Linear, and the model that comes out is an ordinary float
model: no `quantization_config` stays on it and `save_pretrained` writes the float weights, which any loader reads.
With `quantization_config=WeightOnlyConfig(...)` the dequantized weights go straight on into loom's int8/int4
Linears instead (quantize while loading; that model saves as its WeightOnlyConfig does).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from loom.kernels import is_plain_linear
from loom.quantization.base import is_skipped
from loom.quantization.gptq_awq_config import _StoredConfig
from loom.quantization.prequantized import CollectingQuantizer, mismatch

logger = logging.getLogger("loom")
FP8_METHOD = "fp8"
_FIELD = "quantization_config"


def float8_dtypes() -> tuple[torch.dtype, ...]:
    """The float8 dtypes this torch has (none before torch 2.1)."""
    return tuple(d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2")) if d is not None)


class FineGrainedFP8Config(_StoredConfig):
    """The `quantization_config` of an FP8 block-scale checkpoint; the dict from config.json is kept verbatim.

    loom reads `weight_block_size` ([rows, cols], or null for one scale per tensor), `activation_scheme` "dynamic"
    (activations are not stored quantized), `modules_to_not_convert` (alias `ignored_layers`) and `scale_fmt`
    "float" or "ue8m0" (power-of-two scales stored as exponent bytes)."""

    quant_method = FP8_METHOD

    def __init__(self, activation_scheme: str = "dynamic", weight_block_size=(128, 128), dequantize: bool = False,
                 modules_to_not_convert: list | None = None, **kwargs) -> None:
        if modules_to_not_convert is None:  # MiniMax's name for it
            modules_to_not_convert = kwargs.pop("ignored_layers", None)
        if modules_to_not_convert is not None:
            kwargs["modules_to_not_convert"] = modules_to_not_convert
        super().__init__(activation_scheme=activation_scheme, weight_block_size=weight_block_size,
                         dequantize=dequantize, **kwargs)
        if str(activation_scheme).lower() != "dynamic":
            raise ValueError(f"{_FIELD}.activation_scheme={activation_scheme!r} is not supported: loom reads FP8 "
                             "checkpoints with dynamic activation scaling (no stored activation scales) and runs them "
                             "dequantized; use a checkpoint exported with activation_scheme 'dynamic'")
        block = weight_block_size
        if block is not None and not (isinstance(block, (list, tuple)) and len(block) == 2 and all(
                isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"{_FIELD}.weight_block_size={block!r} must be [rows, cols], two positive integers "
                             "(or null for one scale per tensor)")
        self.weight_block_size = tuple(block) if block is not None else None
        self.scale_fmt = kwargs.get("scale_fmt", "float")
        if self.scale_fmt not in ("float", "ue8m0"):
            raise ValueError(f"{_FIELD}.scale_fmt={self.scale_fmt!r} is not supported; loom reads 'float' and 'ue8m0'")
        for key, allowed in (("expert_dtype", (None, "fp8")), ("modules_to_convert", (None, []))):
            if kwargs.get(key) not in allowed:
                raise ValueError(f"{_FIELD}.{key}={kwargs[key]!r} is not supported: loom reads FP8 Linear weights "
                                 "only (no FP4 experts, no FP8 embedding tables)")


class FP8Quantizer(CollectingQuantizer):
    """Dequantizes each FP8 Linear weight with its block scales as the pair streams in. `then` (a WeightOnly
    quantizer) re-quantizes the result into loom's int8/int4 Linears."""

    method = FP8_METHOD
    format_name = "FP8"
    tensor_names = ("weight", "weight_scale_inv")
    config: FineGrainedFP8Config

    def __init__(self, config, pre_quantized: bool, then=None) -> None:
        super().__init__(config, pre_quantized)
        self.then = then
        self._dtype: torch.dtype | None = None
        self._stored_float: set[str] = set()  # targeted Linears whose checkpoint weight is not fp8: loaded as stored

    def validate_environment(self, device=None) -> None:
        if getattr(torch, "float8_e4m3fn", None) is None:
            raise RuntimeError(f"this FP8 checkpoint stores float8_e4m3fn weights, and torch {torch.__version__} has "
                               "no float8 dtypes to read them; upgrade torch (2.1 or newer)")

    def targets(self, model: nn.Module) -> list[str]:
        # Linears whose checkpoints store weights transposed (GPT-2's Conv1D) are no Linear to FP8 writers
        skip = self.config.modules_to_not_convert
        transposed = getattr(type(model), "_transposed_checkpoint_weights", ())
        return [n for n, m in model.named_modules() if is_plain_linear(m) and not is_skipped(n, skip)
                and not any(f"{n}.weight".endswith(s) for s in transposed)]

    def prepare_model(self, model: nn.Module) -> None:
        self.validate_environment()
        self.converted = self.targets(model)
        self._config_dtype = getattr(getattr(model, "config", None), "dtype", None)
        if self.then is not None:
            self.then.prepare_model(model)

    def required(self, module: str) -> tuple[str, ...]:
        return self.tensor_names

    def accepts_shape_change(self, name: str) -> bool:
        return super().accepts_shape_change(name) or (self.then is not None and self.then.accepts_shape_change(name))

    # -- loader hook ---------------------------------------------------------------------------------------------
    def load_tensor(self, model, name, source, dtype, device):
        module, _, attr = name.rpartition(".")
        fp8 = source.dtype in float8_dtypes()
        if self._owned(name) is None:
            if fp8:
                why = "quantization_config.modules_to_not_convert lists it" if is_skipped(
                    module, self.config.modules_to_not_convert) else "loom has no FP8 Linear for it"
                raise mismatch(name, f"stored in {source.dtype}, but {why}, so it has no FP8 dequantization")
            return self.then.load_tensor(model, name, source, dtype, device) if self.then else None
        if attr == "weight" and not fp8:  # a float weight (e.g. a layer left unquantized): as stored
            if "weight_scale_inv" in self._pending.get(module, {}):
                raise mismatch(name, f"stored in {source.dtype} next to a weight_scale_inv; an FP8 weight is "
                               "float8_e4m3fn")
            self._stored_float.add(module)
            return self.then.load_tensor(model, name, source, dtype, device) if self.then else None
        if fp8 and dtype not in float8_dtypes():  # the loader gives an fp8 tensor from_pretrained's dtype= if any
            self._dtype = dtype
        return super().load_tensor(model, name, source, dtype, device)

    def load_extra_tensor(self, model, name, source) -> bool:
        module, _, attr = name.rpartition(".")
        if attr == "weight_scale_inv" and module in self._stored_float:
            raise mismatch(name, f"{module}.weight is stored in float, not float8_e4m3fn, so it has no scales")
        return super().load_extra_tensor(model, name, source)

    def assemble(self, model, name: str, t: dict[str, torch.Tensor]) -> None:
        w = self.dequantize(name, t["weight"], t["weight_scale_inv"])
        if self.then is not None and name in self.then._converted_set():
            value = self.then.load_tensor(model, f"{name}.weight", _Given(w), self.dtype(), w.device)
        else:
            value = nn.Parameter(w.to(self.dtype()), requires_grad=False)
        setattr(model.get_submodule(name), "weight", value)

    def dtype(self) -> torch.dtype:
        """from_pretrained's dtype=, else the checkpoint's config dtype (torch_dtype), else float32."""
        configured = self._config_dtype
        if isinstance(configured, str):
            configured = getattr(torch, configured.removeprefix("torch."), None)
        return self._dtype or (configured if isinstance(configured, torch.dtype) else torch.float32)

    def dequantize(self, name: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float32 weight = q * scale of its block (per-tensor scale without weight_block_size)."""
        if q.dtype not in float8_dtypes():
            raise mismatch(f"{name}.weight", f"stored in {q.dtype}; an FP8 weight is float8_e4m3fn")
        out, inp = q.shape
        rows, cols = self.config.weight_block_size or (out, inp)
        grid = (-(-out // rows), -(-inp // cols))
        if scale.numel() != grid[0] * grid[1]:
            raise mismatch(f"{name}.weight_scale_inv", f"holds {tuple(scale.shape)} scales, but a ({out}, {inp}) "
                           f"weight in blocks of {rows}x{cols} (weight_block_size) has {grid}; fix weight_block_size "
                           "in config.json to the block size the checkpoint was written with")
        if scale.dtype == torch.uint8:  # ue8m0 exponent bytes: 2 ** (byte - 127)
            scale = torch.ldexp(torch.ones(scale.shape), scale.to(torch.int32) - 127)
        scale, w = scale.float().reshape(grid), q.float()
        if out % rows or inp % cols:  # partial last blocks
            return w.mul_(scale.repeat_interleave(rows, 0)[:out].repeat_interleave(cols, 1)[:, :inp])
        w.view(grid[0], rows, grid[1], cols).mul_(scale[:, None, :, None])  # in place: one float32 copy at a time
        return w

    # -- after loading: a float model (or the WeightOnly quantizer's) --------------------------------------------
    def finish(self, model: nn.Module) -> None:
        missing = [f"{m}.{k}" for m, t in self._pending.items() for k in self.tensor_names if k not in t]
        if missing:
            raise ValueError(f"the FP8 checkpoint lacks {', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}"
                             ": a float8 weight needs its weight_scale_inv (and a scale its weight); re-download or "
                             "re-export the checkpoint")
        if self.assembled:
            into = (f"then quantized to loom's int{self.then.config.bits}" if self.then else f"to {self.dtype()}")
            saves = "in that quantization" if self.then else "the float weights"
            logger.warning(f"{len(self.assembled)} FP8 Linear weights (quant_method 'fp8') were dequantized {into} "
                           "at load, as the reference does on CPU: loom has no fp8 kernel. The model keeps no FP8 "
                           f"quantization_config; save_pretrained writes {saves}")
        if self.then is not None:
            self.then.finish(model)
            return
        if getattr(model, "config", None) is not None and hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


class _Given:
    """A loader TensorSource over a tensor already in memory (the dequantized weight)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.shape, self.dtype = tensor, tuple(tensor.shape), tensor.dtype

    def get(self) -> torch.Tensor:
        return self.tensor
