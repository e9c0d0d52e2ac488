"""PreTrainedModel: from_pretrained / save_pretrained, weight tying, embedding resizing, gradient checkpointing.

from_pretrained runs the named stages of loom/load_stages.py (config -> hooks -> dtype -> files -> build on the meta
device -> hooks prepare the model -> stream tensors into their final dtype/device/form -> tie, initialise only what
is truly missing -> finish, report, eval()); formats take part as LoadHooks (loom/load_hooks.py), and save_pretrained
writes a model in the formats of the hooks it keeps. The full-precision model is never built twice.
"""
from __future__ import annotations

import copy
import functools
import inspect
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from loom.adapters import AdapterMixin
from loom.configuration import PretrainedConfig, checked_attn_implementation
from loom.hub import pop_hub_kwargs, push_settings, upload_files
from loom.hub_push import PushToHubMixin
from loom.kernels import use_kernels_
from loom.load_hooks import LoadRequest, save_hooks
from loom.saving import write_model_dir
from loom.utils import parse_dtype

_ABSENT = object()


def _accepting_cache_kwarg(forward):
    """`forward` taking the reference 5.x's `cache=` as its `past_key_values` (the name it deprecated).

    Model forwards swallow unknown keywords (`**kwargs`, as the reference's do), so without this a script written for
    5.x that passes `cache=` would run with no cache, silently. Both names at once raise, as in the reference."""
    params = inspect.signature(forward).parameters
    if "past_key_values" not in params or "cache" in params:
        return forward

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if "cache" in kwargs:
            if kwargs.get("past_key_values") is not None:
                raise ValueError(f"{type(self).__name__}.forward got both `cache` and `past_key_values`; pass the "
                                 "cache once (`cache=` is the reference 5.x's name, `past_key_values=` the older one)")
            kwargs["past_key_values"] = kwargs.pop("cache")
        return forward(self, *args, **kwargs)

    return wrapper


class PreTrainedModel(AdapterMixin, nn.Module, PushToHubMixin):
    """Base class of every loom model."""

    config_class: ClassVar[type[PretrainedConfig]] = PretrainedConfig
    base_model_prefix: ClassVar[str] = ""
    # model key of a tied parameter -> the parameter it shares storage with (when config.tie_word_embeddings)
    _tied_weights_keys: ClassVar[dict[str, str]] = {}
    # suffixes of weights stored transposed in checkpoints (GPT-2's Conv1D); flipped on load and on save
    _transposed_checkpoint_weights: ClassVar[tuple[str, ...]] = ()
    # regexes of checkpoint keys that are expected to be unused (old buffers) and are dropped quietly
    _keys_to_ignore_on_load_unexpected: ClassVar[tuple[str, ...]] = ()
    # regex of a model key -> (dim, config key, what it counts): a checkpoint whose size there differs gets an error
    # naming the config key (a Mixtral router's rows are its `num_local_experts`)
    _config_dims: ClassVar[dict[str, tuple[int, str, str]]] = {}
    _no_split_modules: ClassVar[list[str]] = []
    # tensor-parallel plan: module-name pattern -> "colwise" | "rowwise" | "embedding" | ...
    _tp_plan: ClassVar[dict[str, str]] = {}
    supports_gradient_checkpointing: ClassVar[bool] = True
    main_input_name: ClassVar[str] = "input_ids"
    # What the reference's model tests read as the model's contract: loom's attention runs through torch's SDPA (or
    # the eager formula); it has no flash-attention or flex-attention kernels and no pluggable attention backends.
    _supports_sdpa: ClassVar[bool] = True
    _supports_flash_attn: ClassVar[bool] = False
    _supports_flex_attn: ClassVar[bool] = False
    _supports_attention_backend: ClassVar[bool] = False
    _compatible_flash_implementations: ClassVar[list[str] | None] = None
    _can_compile_fullgraph: ClassVar[bool] = False
    _keep_in_fp32_modules: ClassVar[list[str] | None] = None
    _keep_in_fp32_modules_strict: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_load_missing: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_save: ClassVar[list[str] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = _accepting_cache_kwarg(cls.__dict__["forward"])

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}")
        config._attn_implementation = checked_attn_implementation(config)
        self.config = config
        self.name_or_path = getattr(config, "_name_or_path", "")
        self.generation_config = None
        self.gradient_checkpointing = False

    # -- initialisation ------------------------------------------------------------------------------------------
    def post_init(self) -> None:
        """Initialise weights (skipped on the meta device) and tie them."""
        if not _on_meta(self):
            self.apply(self._init_weights)
        self.tie_weights()
        if getattr(self.config, "gradient_checkpointing", False):  # a config of the 4.x era asks for it this way
            self.gradient_checkpointing_enable()
        use_kernels_(self)  # loom's fast path for plain Linears, applied here so no model file holds kernel code
        if self.can_generate() and self.generation_config is None:
            from loom.generation.config import GenerationConfig

            self.generation_config = GenerationConfig.from_model_config(self.config)

    def init_weights(self) -> None:
        """Initialise every weight afresh and tie them (what post_init does on a model built off the meta device)."""
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear) and module.weight.is_floating_point():  # quantized Linears hold integers
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            if getattr(module, "weight", None) is not None:
                module.weight.data.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    def _init_missing_(self, names: list[str], device_for) -> None:
        """Materialise and initialise parameters the checkpoint did not provide; loaded siblings are kept."""
        by_module: dict[str, list[str]] = {}
        for name in names:
            mod, _, attr = name.rpartition(".")
            by_module.setdefault(mod, []).append(attr)
        for mod_name, attrs in by_module.items():
            module = self.get_submodule(mod_name) if mod_name else self
            keep = {n: t for n, t in module.named_parameters(recurse=False) if n not in attrs}
            keep.update({n: t for n, t in module.named_buffers(recurse=False) if n not in attrs})
            for attr in attrs:
                old = getattr(module, attr)
                # zeros, not empty: a parameter `_init_weights` does not know (a head's separate bias) stays zero,
                # as in the reference, instead of whatever the memory held
                new = torch.zeros(old.shape, dtype=old.dtype, device=device_for(f"{mod_name}.{attr}".lstrip(".")))
                if attr in module._parameters:
                    module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
                else:
                    module._buffers[attr] = new
            saved = {n: t.detach().clone() for n, t in keep.items() if not t.is_meta}
            with torch.no_grad():
                self._init_weights(module)
                for n, t in saved.items():
                    getattr(module, n).copy_(t)

    # -- embeddings and tying ------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        base = getattr(self, self.base_model_prefix, self) if self.base_model_prefix else self
        if base is not self:
            return base.get_input_embeddings()
        raise NotImplementedError(f"{type(self).__name__} does not define get_input_embeddings")

    def set_input_embeddings(self, value: nn.Module) -> None:
        base = getattr(self, self.base_model_prefix, self) if self.base_model_prefix else self
        if base is not self:
            return base.set_input_embeddings(value)
        raise NotImplementedError(f"{type(self).__name__} does not define set_input_embeddings")

    def get_output_embeddings(self) -> nn.Module | None:
        return None

    def tie_weights(self) -> None:
        """Share each tied parameter with its source (lm_head <- input embeddings) when the config asks for it."""
        if not getattr(self.config, "tie_word_embeddings", False):
            return
        for target, source in self._tied_weights_keys.items():
            try:
                src = self.get_parameter(source)
            except AttributeError:
                continue
            mod, _, attr = target.rpartition(".")
            module = self.get_submodule(mod) if mod else self
            if attr in module._parameters:
                module._parameters[attr] = src

    def tied_parameter_names(self) -> set[str]:
        """Model keys that are tied copies of another parameter right now (not saved, not reported missing)."""
        names = set()
        if not getattr(self.config, "tie_word_embeddings", False):
            return names
        for target, source in self._tied_weights_keys.items():
            try:
                if self.get_parameter(target) is self.get_parameter(source):
                    names.add(target)
            except AttributeError:
                pass
        return names

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the vocabulary; new rows get the mean (and covariance-free spread) of the old ones."""
        old = self.get_input_embeddings()
        if new_num_tokens is None:
            new_num_tokens = old.num_embeddings
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or
                                               not isinstance(pad_to_multiple_of, int)):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}: pass an integer (e.g. 64), the multiple the "
                             "new vocabulary size is rounded up to")
        if pad_to_multiple_of:
            new_num_tokens = ((new_num_tokens + pad_to_multiple_of - 1) // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens <= 0:
            raise ValueError(f"new_num_tokens must be positive, got {new_num_tokens}")
        new = _resized_rows(old.weight, new_num_tokens, mean_resizing)
        emb = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=old.padding_idx
                           if old.padding_idx is None or old.padding_idx < new_num_tokens else None,
                           device=new.device, dtype=new.dtype)
        emb.weight = nn.Parameter(new, requires_grad=old.weight.requires_grad)
        self.set_input_embeddings(emb)
        head = self.get_output_embeddings()
        tied = getattr(self.config, "tie_word_embeddings", False)
        if head is not None and not tied:
            head.weight = nn.Parameter(_resized_rows(head.weight, new_num_tokens, mean_resizing))
        # the head's bias, or one kept beside the head's Linear (BERT's cls.predictions.bias, RoBERTa's lm_head.bias)
        holders = [] if head is None else [head] + [m for m in self.modules() if any(c is head for c in m.children())]
        for holder in holders:
            bias = getattr(holder, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.dim() == 1 and bias.shape[0] == old.num_embeddings:
                holder.bias = nn.Parameter(_resized_bias(bias, new_num_tokens))
        if head is not None and hasattr(head, "out_features"):
            head.out_features = new_num_tokens
        self.config.vocab_size = self.vocab_size = new_num_tokens
        self.tie_weights()
        return self.get_input_embeddings()

    # -- training switches ---------------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block's activations in backward; gradient_checkpointing_kwargs go to
        torch.utils.checkpoint.checkpoint (loom's default is use_reentrant=False)."""
        if not self.supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        options = dict(gradient_checkpointing_kwargs or {})
        known = {"use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"}
        if set(options) - known:
            raise ValueError(f"gradient_checkpointing_kwargs {sorted(set(options) - known)} are not options of "
                             f"torch.utils.checkpoint.checkpoint; use some of {sorted(known)}")
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True
                for block in m.modules():
                    block.checkpoint_options = options

    def gradient_checkpointing_disable(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    # the reference's 5.x names
    is_activation_checkpointing = is_gradient_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def tp_plan(self) -> dict[str, str]:
        """The tensor-parallel plan: module-name pattern -> style."""
        return dict(self._tp_plan)

    @property
    def base_model(self) -> nn.Module:
        """The model under a head (at `base_model_prefix`), or the model itself when it has no head."""
        return getattr(self, self.base_model_prefix, self) if self.base_model_prefix else self

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        for p in self.parameters():
            if id(p) in seen or id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    _can_generate: ClassVar[bool] = False

    @classmethod
    def can_generate(cls) -> bool:
        return cls._can_generate

    def generate(self, *args, **kwargs):
        """Text generation; see `loom.generation.generate`."""
        if not self.can_generate():
            raise TypeError(f"{type(self).__name__} has no language-modelling head, so it cannot generate; load it "
                            "with AutoModelForCausalLM")
        from loom.generation.utils import generate

        return generate(self, *args, **kwargs)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Whether set_attn_implementation can switch this class (every loom model can)."""
        return True

    def set_attn_implementation(self, attn_implementation: str | dict) -> None:
        """Switch the attention every layer runs to "sdpa" or "eager" (as the reference's method). The name is checked
        first, so a refused one leaves the model as it was. A dict names it under "" (loom's models have no
        sub-models, so no other key is taken)."""
        name = attn_implementation
        if isinstance(name, dict):
            others = sorted(set(name) - {""})
            if others:
                raise ValueError(f"set_attn_implementation({attn_implementation!r}): {type(self.config).__name__} has "
                                 f"no sub-configs {others}; pass a name, or a dict with only the key ''")
            name = name.get("", self.config._attn_implementation)
        self.config._attn_implementation = checked_attn_implementation(self.config, name)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values=None, attention_mask=None,
                                      cache_position: torch.Tensor | None = None, **kwargs) -> dict:
        """The forward inputs of one generation step: the tokens the cache has not seen yet (peft's generation
        wrappers call this; loom's own loop prepares its steps in loom/generation/decoder.py)."""
        if cache_position is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            cache_position = torch.arange(seen, input_ids.shape[1], device=input_ids.device)
        return {"input_ids": input_ids[:, cache_position], "attention_mask": attention_mask,
                "past_key_values": past_key_values, "cache_position": cache_position, **kwargs}

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: PretrainedConfig, dtype=None, attn_implementation: str | None = None,
                    **kwargs) -> "PreTrainedModel":
        dtype = parse_dtype(kwargs.pop("torch_dtype", dtype))
        if attn_implementation is not None:
            config = copy.deepcopy(config)  # the caller's config keeps its own setting, as in the reference
            config._attn_implementation = attn_implementation
        model = cls(config, **kwargs)
        if dtype not in (None, "auto"):
            model.to(dtype)
        return model

    _from_config = from_config  # the reference's name for it, which its model tests call

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        config: PretrainedConfig | str | None = None, dtype=None, torch_dtype=None,
                        device_map=None, max_memory: dict | None = None, offload_folder: str | None = None,
                        quantization_config=None, tp_plan=None, device_mesh=None, output_loading_info: bool = False,
                        ignore_mismatched_sizes: bool = False, variant: str | None = None,
                        use_safetensors: bool | None = None, attn_implementation: str | None = None,
                        disable_mmap: bool | None = None, **kwargs: Any):
        """Load a checkpoint directory, HF-cache entry, packaged model or hub id (see the module docstring).

        `attn_implementation`: "sdpa" (the default) or "eager" (the math written out; a forward asked for
        output_attentions=True computes them eagerly under either).
        `disable_mmap=True`: read safetensors weights into the process's own memory instead of using them in place
        from a mapping of the file (the default, which loads fastest and shares the page cache). On the CPU that
        memory is then backed by 2 MiB pages where Linux allows it, which a decode step streams about 1.4x faster
        than the file's 4 KiB pages (the bench Llama in fp32: 24.6 -> 17.0 ms per token at 1 thread), at the cost
        of a slower load (the pages are copied, and finding huge pages can take seconds on a fragmented machine)
        and of memory the kernel can no longer drop and re-read."""
        from loom import load_stages

        hub = pop_hub_kwargs(kwargs)
        for legacy in ("low_cpu_mem_usage", "_fast_init", "use_auth_token", "resume_download", "mirror"):
            kwargs.pop(legacy, None)
        request = LoadRequest(
            pretrained_model_name_or_path, config=config, dtype=torch_dtype if dtype is None else dtype,
            device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
            quantization_config=quantization_config, tp_plan=tp_plan, device_mesh=device_mesh,
            gguf_file=kwargs.pop("gguf_file", None), variant=variant, use_safetensors=use_safetensors,
            ignore_mismatched_sizes=ignore_mismatched_sizes, attn_implementation=attn_implementation,
            disable_mmap=disable_mmap, hub=hub)
        return load_stages.load_pretrained(cls, request, model_args, kwargs, output_loading_info)

    def _init_buffers_(self, device_for) -> None:
        """Recompute non-persistent buffers (rotary tables) on the device of their module."""
        for name, module in self.named_modules():
            if hasattr(module, "_init_buffers"):
                module._init_buffers(device=device_for(f"{name}.inv_freq"))

    # -- saving --------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, state_dict: dict | None = None,
                        max_shard_size: int | str = "5GB", safe_serialization: bool = True,
                        variant: str | None = None, is_main_process: bool = True, push_to_hub: bool = False,
                        save_function=None, **kwargs) -> None:
        """Write config.json, generation_config.json and (sharded) safetensors. Over an existing model the directory
        loads as the old or the new model whatever the point of failure (loom/saving.py). With push_to_hub=True the
        written files are then uploaded (`repo_id`, `commit_message`, `private`, `token`, `create_pr`)."""
        save_directory = Path(save_directory)
        push = push_settings(kwargs, push_to_hub, save_directory, "save_pretrained")
        if save_directory.exists() and not save_directory.is_dir():
            raise NotADirectoryError(f"save_pretrained: {save_directory} is a file; pass a directory path")
        if not safe_serialization:
            raise ValueError("loom writes safetensors only (safe_serialization=True): pickle-based .bin files can "
                             "run code when loaded")
        if save_function not in (None, torch.save):  # the reference calls it for .bin files only, never written here
            raise ValueError("save_pretrained(save_function=...) is not supported: loom writes safetensors with "
                             "atomic file writes; drop the argument")
        if not is_main_process:
            return
        if self._hf_peft_config_loaded:  # as the reference: a model holding adapters saves the active adapter only
            return self.save_adapter(save_directory)
        formats = save_hooks(self)  # the formats this model saves in (a quantizer's, a registered hook's)
        for hook in formats:
            if not hook.is_serializable():
                raise ValueError(f"{type(hook).__name__} models cannot be saved: {hook.why_not_serializable()}")
        save_directory.mkdir(parents=True, exist_ok=True)
        tensors = self.checkpoint_state_dict() if state_dict is None else dict(state_dict)
        for hook in formats:
            tensors = hook.checkpoint_tensors(self, tensors)
        texts = {}
        if self.generation_config is not None and self.can_generate():
            texts["generation_config.json"] = self.generation_config.to_json_string()
        config = self.config
        config.architectures = [type(self).__name__]
        config.dtype = str(self.dtype).removeprefix("torch.")
        fields = {k: v for hook in formats for k, v in hook.saved_config_fields(self).items()}
        live = {k: getattr(config, k, _ABSENT) for k in fields}
        for k, v in fields.items():
            setattr(config, k, v)
        texts["config.json"] = config.to_json_string()  # renamed into place last
        for k, v in live.items():  # the fields are the saved form's; the live config keeps its own
            if v is _ABSENT:
                delattr(config, k)
            else:
                setattr(config, k, v)
        written = write_model_dir(save_directory, tensors, texts, max_shard_size=max_shard_size, variant=variant)
        if push is not None:
            upload_files(save_directory, written, push, "Upload model")

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors as the checkpoint stores them: tied copies dropped, transposed weights flipped back."""
        tied = self.tied_parameter_names()
        out = {}
        for name, tensor in self.state_dict().items():
            if name in tied:
                continue
            if any(name.endswith(sfx) for sfx in self._transposed_checkpoint_weights):
                tensor = tensor.t()
            out[name] = tensor
        return out


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _resized_bias(bias: torch.Tensor, n: int) -> torch.Tensor:
    grown = torch.zeros(n, dtype=bias.dtype, device=bias.device)
    keep = min(n, bias.shape[0])
    grown[:keep] = bias.data[:keep]
    return grown


def _resized_rows(weight: torch.Tensor, n: int, mean_resizing: bool) -> torch.Tensor:
    old_n = weight.shape[0]
    new = torch.empty(n, weight.shape[1], dtype=weight.dtype, device=weight.device)
    keep = min(n, old_n)
    with torch.no_grad():
        new[:keep] = weight[:keep]
        if n > old_n:
            if mean_resizing:
                mean = weight.float().mean(0)
                std = weight.float().std(0) if old_n > 1 else torch.zeros_like(mean)
                new[old_n:] = (mean + torch.randn(n - old_n, weight.shape[1], device=weight.device) * std * 1e-2
                               ).to(weight.dtype)
            else:
                new[old_n:].normal_(0.0, 0.02)
    return new
