"""`from_pretrained` as named stages, each a function of the request and what the stages before it made:

    resolve_config -> select_hooks -> resolve_dtype -> resolve_files -> plan_placement -> build_on_meta ->
    apply_hooks -> stream_weights -> tie_and_initialise -> finalize

Formats take part through their `LoadHook`s (loom/load_hooks.py): the built-in ones (GGUF, quantization, tensor
parallel) and any registered with `register_load_hook`. The full-precision model is never built twice: it is built
on the meta device and every tensor is streamed straight into its final dtype, device, shard or quantized form.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from loom import loading
from loom.configuration import PretrainedConfig, checked_attn_implementation
from loom.load_hooks import LoadHook, LoadRequest, attach_save_hook, checked_hooks, registered_load_hooks
from loom.kernels.memory import back_with_huge_pages, gather_small_buffers
from loom.utils import parse_dtype

logger = logging.getLogger("loom")


def load_pretrained(cls, request: LoadRequest, model_args=(), config_overrides: dict | None = None,
                    output_loading_info: bool = False):
    """The whole load, stage by stage (PreTrainedModel.from_pretrained's body)."""
    request.config = resolve_config(cls, request, config_overrides or {})
    hooks = select_hooks(request)
    request.dtype = resolve_dtype(request, hooks)
    ckpt = resolve_files(request, hooks)
    device_for, dispatch = plan_placement(cls, request)
    model = build_on_meta(cls, request, model_args)
    apply_hooks(model, hooks, device_for)
    info = stream_weights(model, ckpt, request, hooks, device_for)
    tie_and_initialise(model, info, request.dtype, device_for)
    model = finalize(model, info, request, hooks, dispatch)
    return (model, info.as_dict()) if output_loading_info else model


# -- config, hooks, dtype, files --------------------------------------------------------------------------------
def resolve_config(cls, request: LoadRequest, overrides: dict):
    """The model's config: given, or read from the checkpoint (keyword overrides applied), its attention checked
    before any weight is read."""
    config = request.config
    if not isinstance(config, PretrainedConfig):
        config = cls.config_class.from_pretrained(config or request.path, **request.hub, **overrides,
                                                  gguf_file=request.gguf_file)
    else:
        for k, v in overrides.items():
            setattr(config, k, v)
    if request.attn_implementation is not None:
        config._attn_implementation = request.attn_implementation
    config._attn_implementation = checked_attn_implementation(config)
    config._name_or_path = str(request.path)
    return config


def builtin_selectors(request: LoadRequest) -> list:
    """The selector (request -> hook or None) of each built-in format this request may involve, imported only then
    (`import loom` and plain loads stay cheap). Order matters: the first hook that takes a tensor wins."""
    selectors = []
    if request.gguf_file is not None:
        from loom.gguf.load import GgufLoadHook

        selectors.append(GgufLoadHook.for_load)
    if request.quantization_config is not None or getattr(request.config, "quantization_config", None) is not None:
        from loom.quantization.registry import quantizer_for_load

        selectors.append(quantizer_for_load)
    if request.tp_plan is not None:
        from loom.distributed.tensor_parallel import TensorParallelLoadHook

        selectors.append(TensorParallelLoadHook.for_load)
    return selectors


def select_hooks(request: LoadRequest) -> list[LoadHook]:
    """The hooks taking part in this load: the built-in formats', then the registered ones', in that order."""
    selectors = builtin_selectors(request) + [cls.for_load for cls in registered_load_hooks()]
    return checked_hooks(hook for hook in (select(request) for select in selectors) if hook is not None)


def resolve_dtype(request: LoadRequest, hooks: list[LoadHook]) -> torch.dtype | None:
    """dtype= (or torch_dtype=), "auto" read from the config; None keeps the checkpoint's dtypes. Each hook may
    then adjust the config and the dtype."""
    dtype = parse_dtype(request.dtype)
    if dtype == "auto":
        dtype = parse_dtype(getattr(request.config, "dtype", None))
    for hook in hooks:
        dtype = hook.configure(request.config, dtype)
    return dtype


def resolve_files(request: LoadRequest, hooks: list[LoadHook]) -> loading.CheckpointFiles:
    """The checkpoint files: a format's own (GGUF), else model.safetensors / its shards / pytorch_model.bin."""
    for hook in hooks:
        files = hook.checkpoint_files(request)
        if files is not None:
            return files
    return loading.find_checkpoint_files(request.path, variant=request.variant,
                                         use_safetensors=request.use_safetensors, **request.hub)


def plan_placement(cls, request: LoadRequest):
    """(device_for(name), dispatch) for the device_map; "auto"/offload go through accelerate's big-model dispatch."""
    device_map = request.device_map
    if device_map is None or isinstance(device_map, (str, torch.device, int)) and device_map not in (
            "auto", "balanced", "balanced_low_0", "sequential"):
        try:
            device = torch.device("cpu" if device_map is None else device_map)
        except (RuntimeError, TypeError):
            raise ValueError(f"device_map={device_map!r} is not a device; pass 'cpu', 'cuda:0', 'auto' or a dict of "
                             "module name -> device") from None
        return (lambda name: device), None
    from loom.dispatch import plan_device_map

    return plan_device_map(cls, request.config, device_map, request.max_memory, request.offload_folder,
                           request.dtype)


# -- the model ---------------------------------------------------------------------------------------------------
def build_on_meta(cls, request: LoadRequest, model_args=()) -> nn.Module:
    """The model on the meta device, no init run; a config value it cannot build is an error naming the path."""
    with loading.empty_init():
        try:
            return cls(request.config, *model_args)
        except ValueError as e:  # a config value the model cannot build (rope_type, hidden_act, experts, ...)
            if str(request.path) in str(e) or type(e) is not ValueError:
                raise
            raise type(e)(f"{request.path}: {e}") from None


def apply_hooks(model: nn.Module, hooks: list[LoadHook], device_for) -> None:
    """Each hook learns the placement and changes the meta model (quantized modules, tensor-parallel plan)."""
    for hook in hooks:
        hook.place_with(device_for)
        hook.prepare_model(model)


def stream_weights(model: nn.Module, ckpt, request: LoadRequest, hooks: list[LoadHook], device_for):
    """Every tensor of the checkpoint into its final form (loom/loading.py); what did not line up, as LoadingInfo.
    `disable_mmap=True` reads safetensors into fresh memory (finalize then backs it with huge pages)."""
    if request.disable_mmap not in (None, True, False):
        raise TypeError(f"disable_mmap must be True, False or None, got {request.disable_mmap!r}")
    return loading.stream_checkpoint(model, ckpt, dtype=request.dtype, device_for=device_for, hooks=hooks,
                                     ignore_mismatched_sizes=request.ignore_mismatched_sizes,
                                     private=bool(request.disable_mmap))


def tie_and_initialise(model: nn.Module, info, dtype, device_for) -> None:
    """Tie weights, initialise only what is truly missing, cast what is left to `dtype`, rebuild rotary tables."""
    model.tie_weights()
    tied = model.tied_parameter_names()
    info.missing_keys = [k for k in info.missing_keys if k not in tied]
    truly_missing = info.missing_keys + [k for k, _, _ in info.mismatched_keys]
    if truly_missing:
        model._init_missing_(truly_missing, device_for)
        model.tie_weights()  # a tied copy of a parameter just created (a head's bias) must follow it
    if dtype is not None:
        cast_remaining_(model, dtype)
    model._init_buffers_(device_for)


def cast_remaining_(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype and not p.is_meta and \
                    not getattr(module, "_loom_keep_dtype", False):
                module._parameters[name] = nn.Parameter(p.data.to(dtype), requires_grad=p.requires_grad)
    model.tie_weights()


def finalize(model: nn.Module, info, request: LoadRequest, hooks: list[LoadHook], dispatch) -> nn.Module:
    """Hooks finish (assemble, check, shard); the model keeps the hooks it saves with; the load is reported; eval
    mode, the generation config, then the device map's dispatch."""
    for hook in hooks:
        hook.finish(model)
        if hook.transforms_saves:
            attach_save_hook(model, hook)
    cls = type(model)
    message = loading.report(info, f"{cls.__name__} from {request.path}", model._keys_to_ignore_on_load_unexpected)
    if message:
        logger.warning(message)
        if info.missing_keys or info.mismatched_keys:
            warnings.warn(message, stacklevel=4)
    model.eval()
    if model.can_generate():
        model.generation_config = load_generation_config(request)
    if dispatch is None:  # weights made at load (cast, quantized, copied) read faster from huge pages
        gather_small_buffers(model)
        back_with_huge_pages([*model.parameters(), *model.buffers()])
    return model if dispatch is None else dispatch(model)


def load_generation_config(request: LoadRequest):
    from loom.generation.config import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(request.path, **request.hub)
    except OSError:
        return GenerationConfig.from_model_config(request.config)
