"""Checks and normalisation of TrainingArguments, run when they are constructed.

Every field of the reference is accepted. The ones loom cannot honour (other back ends, multi-node options) are
listed in UNSUPPORTED and refused only when set to a value other than their default, with the reason, so a script
that passes the defaults runs unchanged and one that relies on them fails on its first line instead of silently
training differently.
"""
from __future__ import annotations

import json
import logging
import os
from enum import Enum

from loom.training.optim_options import parse_optim_args

STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = (*STRATEGIES, "best")
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw", "sgd", "adagrad", "rmsprop", "adafactor")
BNB_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix",
                  "ademamix_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_8bit", "lion_32bit",
                  "paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit")
OPTIMIZERS = TORCH_OPTIMIZERS + BNB_OPTIMIZERS
# the reference's other optimizers come from packages loom does not integrate
FOREIGN_OPTIMIZERS = {
    "adamw_torch_xla": "torch_xla", "adamw_torch_npu_fused": "torch_npu", "adamw_anyprecision": "torchdistx",
    "adamw_torch_4bit": "torchao", "adamw_torch_8bit": "torchao", "galore_adamw": "galore_torch",
    "galore_adamw_8bit": "galore_torch", "galore_adafactor": "galore_torch", "galore_adamw_layerwise": "galore_torch",
    "galore_adamw_8bit_layerwise": "galore_torch", "galore_adafactor_layerwise": "galore_torch", "lomo": "lomo_optim",
    "adalomo": "lomo_optim", "grokadamw": "grokadamw", "schedule_free_radam": "schedulefree",
    "schedule_free_adamw": "schedulefree", "schedule_free_sgd": "schedulefree", "apollo_adamw": "apollo_torch",
    "apollo_adamw_layerwise": "apollo_torch", "stable_adamw": "torch_optimi"}
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")  # stepped with metric_for_best_model after evaluations
TOKEN_COUNTING = ("no", "all", "non_padding")
SAMPLING = ("random", "sequential", "group_by_length")
HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "passive")
# (old name, the reference's new name)
ALIASES = (("gradient_checkpointing", "activation_checkpointing"),
           ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))
JSON_FIELDS = ("accelerator_config", "fsdp_config", "deepspeed", "activation_checkpointing_kwargs",
               "gradient_checkpointing_kwargs", "lr_scheduler_kwargs")

_NOT_IN_LOOM = "loom's Trainer does not use Accelerate, DeepSpeed or DDP"
# field -> why loom refuses a non-default value
UNSUPPORTED = {
    "optim_target_modules": "it selects the modules of GaLore/APOLLO optimizers, which loom does not provide",
    "average_tokens_across_devices": "loom always normalises the loss by the token count of all devices",
    "use_liger_kernel": "loom has no Liger kernels; its own CPU kernels apply automatically",
    "liger_kernel_config": "loom has no Liger kernels",
    "eval_use_gather_object": "loom gathers only tensors in evaluation",
    "save_on_each_node": "loom saves on rank 0 only (use a shared filesystem for multi-node runs)",
    "enable_jit_checkpoint": "loom does not checkpoint on SIGTERM; use save_steps and resume_from_checkpoint",
    "accelerator_config": _NOT_IN_LOOM,
    "parallelism_config": f"{_NOT_IN_LOOM}; set tp_size / cp_size / fsdp instead",
    "dataloader_in_order": "loom's DataLoader always yields batches in order",
    "ddp_find_unused_parameters": f"{_NOT_IN_LOOM} (data parallelism is FSDP2: fsdp=True)",
    "ddp_bucket_cap_mb": f"{_NOT_IN_LOOM} (data parallelism is FSDP2: fsdp=True)",
    "ddp_broadcast_buffers": f"{_NOT_IN_LOOM} (data parallelism is FSDP2: fsdp=True)",
    "ddp_static_graph": f"{_NOT_IN_LOOM} (data parallelism is FSDP2: fsdp=True)",
    "ddp_backend": "loom picks nccl on CUDA and gloo on the CPU",
    "ddp_timeout": "set the LOOM_DIST_TIMEOUT environment variable (seconds) instead",
    "fsdp_config": "loom's FSDP2 takes fsdp=True or fsdp='offload'; it has no FSDP1 config",
    "deepspeed": _NOT_IN_LOOM,
    "debug": "loom has no debug features (underflow_overflow, tpu_metrics_debug)",
    "skip_memory_metrics": "loom reports no memory metrics",
}


def normalise(args) -> None:
    """Defaults that depend on other fields, enum members to strings, JSON strings to dicts (as the reference)."""
    if args.output_dir is None:
        args.output_dir = "trainer_output"
    args.output_dir = os.path.expanduser(args.output_dir)
    for name in ("lr_scheduler_type", "optim", "logging_strategy", "eval_strategy", "save_strategy", "hub_strategy"):
        value = getattr(args, name)
        if isinstance(value, Enum):
            setattr(args, name, value.value)
    for name in JSON_FIELDS:
        value = getattr(args, name)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                setattr(args, name, json.loads(value))
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} is not valid JSON ({e}): {value!r}") from None
    # activation_checkpointing is the reference's new name for gradient_checkpointing; both end up equal
    for old, new in ALIASES:
        if getattr(args, new) is None:
            setattr(args, new, getattr(args, old))
        setattr(args, old, getattr(args, new))
    if args.activation_checkpointing is None:
        args.activation_checkpointing = args.gradient_checkpointing = False
    if args.disable_tqdm is None:  # no progress bar when loom's logger is quieter than warnings (the reference's rule)
        args.disable_tqdm = logging.getLogger("loom").getEffectiveLevel() > logging.WARNING
    if str(args.include_num_input_tokens_seen).lower() in ("true", "false"):  # a bool, or one from the command line
        args.include_num_input_tokens_seen = str(args.include_num_input_tokens_seen).lower() == "true"
    if isinstance(args.include_num_input_tokens_seen, bool):
        args.include_num_input_tokens_seen = "all" if args.include_num_input_tokens_seen else "no"
    if (args.torch_compile_mode is not None or args.torch_compile_backend is not None) and not args.torch_compile:
        args.torch_compile = True
    if args.torch_compile and args.torch_compile_backend is None:
        args.torch_compile_backend = "inductor"
    if isinstance(args.debug, str):
        args.debug = args.debug.split()
    if args.eval_strategy != "no":
        args.do_eval = True
    if args.use_cpu:
        args.dataloader_pin_memory = False


def check_choices(args) -> None:
    for name, allowed in (("lr_scheduler_type", SCHEDULERS), ("logging_strategy", STRATEGIES),
                          ("eval_strategy", STRATEGIES), ("save_strategy", SAVE_STRATEGIES),
                          ("include_num_input_tokens_seen", TOKEN_COUNTING), ("hub_strategy", HUB_STRATEGIES),
                          ("log_level", LOG_LEVELS), ("log_level_replica", LOG_LEVELS)):
        if getattr(args, name) not in allowed:
            raise ValueError(f"{name}={getattr(args, name)!r} is not supported; use one of {', '.join(allowed)}")
    if args.optim in FOREIGN_OPTIMIZERS:
        raise ValueError(f"optim={args.optim!r} needs the {FOREIGN_OPTIMIZERS[args.optim]} package, which loom does "
                         f"not integrate; use one of {', '.join(OPTIMIZERS)}")
    if args.optim not in OPTIMIZERS:
        raise ValueError(f"optim={args.optim!r} is not supported; use one of {', '.join(OPTIMIZERS)}")
    if args.train_sampling_strategy == "batch_rebalance":
        raise ValueError("train_sampling_strategy='batch_rebalance' is not implemented in loom; use "
                         "'group_by_length' (similar lengths batched together) or 'random'")
    if args.train_sampling_strategy not in SAMPLING:
        raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} is not supported; use one of "
                         f"{', '.join(SAMPLING)}")
    parse_optim_args(args.optim_args)  # a malformed string fails here, on the script's first line
    unknown = sorted(set(args.include_for_metrics) - {"inputs", "loss"})
    if unknown:
        raise ValueError(f"include_for_metrics={args.include_for_metrics!r}: {unknown} unknown; use 'inputs' "
                         "and/or 'loss'")


def check_sizes(args) -> None:
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if not isinstance(getattr(args, name), int) or getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)!r}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError(f"nothing to train: max_steps={args.max_steps} and num_train_epochs="
                         f"{args.num_train_epochs}; set one of them to a positive value")
    for a, b in (("bf16", "fp16"), ("bf16_full_eval", "fp16_full_eval")):
        if getattr(args, a) and getattr(args, b):
            raise ValueError(f"{a}=True and {b}=True contradict each other; choose one precision")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must lie in [0, 1], got {args.warmup_ratio}")
    if args.warmup_ratio > 0 and args.warmup_steps > 0:
        raise ValueError(f"warmup_steps={args.warmup_steps} and warmup_ratio={args.warmup_ratio} contradict each "
                         "other; set only one")
    if args.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.dataloader_prefetch_factor is not None and args.dataloader_num_workers == 0:
        raise ValueError("dataloader_prefetch_factor needs worker processes (batches are prefetched by workers); "
                         "set dataloader_num_workers > 0 or leave dataloader_prefetch_factor unset")
    if args.dataloader_persistent_workers and args.dataloader_num_workers == 0:
        raise ValueError("dataloader_persistent_workers=True needs worker processes; set dataloader_num_workers > 0")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1 or None, got {args.save_total_limit}")
    if args.eval_steps == 0:  # the reference reads 0 as "unset": eval_steps then follows logging_steps
        args.eval_steps = None
    for name in ("logging_steps", "save_steps", "eval_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        if value is not None and value > 1 and value != int(value):
            raise ValueError(f"{name}={value} must be a whole number of steps, or a ratio of the run below 1")
    for name in ("torch_empty_cache_steps", "eval_accumulation_steps"):
        value = getattr(args, name)
        if value is not None and not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if not 0.0 <= args.label_smoothing_factor < 1.0:
        raise ValueError(f"label_smoothing_factor must lie in [0, 1), got {args.label_smoothing_factor}")
    if args.neftune_noise_alpha is not None and args.neftune_noise_alpha <= 0:
        raise ValueError(f"neftune_noise_alpha must be positive (or None to turn NEFTune off), got "
                         f"{args.neftune_noise_alpha}")
    if args.eval_delay < 0:
        raise ValueError(f"eval_delay must be >= 0, got {args.eval_delay}")
    if args.lr_scheduler_type in METRIC_SCHEDULERS and args.eval_strategy == "no":
        raise ValueError(f"lr_scheduler_type={args.lr_scheduler_type!r} moves the rate with an evaluation metric; set "
                         "eval_strategy to 'steps' or 'epoch'")


def check_unsupported(args) -> None:
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(args)}
    for name, reason in UNSUPPORTED.items():
        value = getattr(args, name)
        if value != defaults[name] and not (name == "debug" and value == []):
            raise ValueError(f"{name}={value!r} is not supported: {reason}. Leave {name} at its default "
                             f"({defaults[name]!r})")


def check_best_model(args) -> None:
    if not args.load_best_model_at_end:
        return
    if args.eval_strategy == "no":
        raise ValueError("load_best_model_at_end=True needs evaluations to pick the best model; set eval_strategy "
                         "to 'steps' or 'epoch'")
    if args.save_strategy == "best":
        return
    if args.save_strategy != args.eval_strategy:
        raise ValueError(f"load_best_model_at_end=True needs save_strategy to match eval_strategy (got "
                         f"save_strategy={args.save_strategy!r}, eval_strategy={args.eval_strategy!r}) so every "
                         "evaluated model is also saved")
    if args.eval_strategy == "steps" and is_ratio(args.eval_steps) == is_ratio(args.save_steps) and \
            round(args.save_steps / args.eval_steps, 8) % 1 != 0:
        raise ValueError(f"load_best_model_at_end=True needs save_steps ({args.save_steps}) to be a multiple of "
                         f"eval_steps ({args.eval_steps})")


def apply_tf32(tf32: bool | None) -> None:
    """tf32=True/False switches TF32 matmuls on CUDA (as the reference does when the arguments are built)."""
    if tf32 is None:
        return
    import torch

    if tf32 and not torch.cuda.is_available():
        raise ValueError("tf32=True needs a CUDA GPU (Ampere or newer); leave tf32 unset on this machine")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def is_ratio(value) -> bool:
    return value is not None and 0 < value < 1
