"""Optimizers (torch's, and bitsandbytes' in bnb_optimizers.py; no decay on biases and norms) and learning-rate
schedules.

Each schedule is a LambdaLR multiplier of the peak learning rate, with the reference's formulas, so the learning
rate at every step matches the reference's schedulers of the same name.
"""
from __future__ import annotations

import math
import re
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from loom.training.adafactor import Adafactor, AdafactorSchedule  # noqa: F401 (AdafactorSchedule: exported here)
from loom.training.greedy_lr import GreedyLR
from loom.training.optim_options import check_optim_options, is_true, parse_optim_args

# parameter-name patterns that never get weight decay (biases and normalisation weights)
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)", re.IGNORECASE)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that get weight decay: all but biases and the weights of normalisation layers."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if not is_norm and not _NO_DECAY.search(full):
                names.add(full)
    return names


def create_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """The optimizer named by args.optim over the model's trainable parameters, in decay / no-decay groups."""
    decay = decay_parameter_names(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    groups = [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return build_optimizer(args.optim, groups, args, model)


# optimizer -> (keys of optim_args read as floats, keys read as booleans), the reference's choices
_TORCH_OPTIONS = {"sgd": (("momentum", "dampening", "weight_decay"), ("nesterov",)),
                  "adagrad": (("lr_decay", "weight_decay", "eps"), ()),
                  "rmsprop": (("momentum", "alpha", "eps", "weight_decay"), ("centered",))}


def build_optimizer(name: str, groups: list[dict], args, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer `name` (an args.optim value) over parameter groups, with args' rates and optim_args."""
    options = parse_optim_args(args.optim_args)
    adam = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if name in ("adamw_torch", "adamw_torch_fused", "adamw", "adafactor"):
        check_optim_options(options, (), name)
    if name in ("adamw_torch", "adamw_torch_fused", "adamw"):
        fused = name == "adamw_torch_fused" and _fused_supported(groups[0]["params"][0])
        return torch.optim.AdamW(groups, **adam, fused=fused or None)
    if name == "adafactor":  # as the reference's Trainer: the schedule drives the learning rate
        return Adafactor(groups, lr=args.learning_rate, relative_step=False, scale_parameter=False)
    if name in _TORCH_OPTIONS:
        floats, flags = _TORCH_OPTIONS[name]
        check_optim_options(options, floats + flags, name)
        kwargs = {k: float(options[k]) for k in floats if k in options}
        kwargs.update({k: is_true(options[k]) for k in flags if k in options})
        cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}[name]
        return cls(groups, lr=args.learning_rate, **kwargs)
    from loom.training.bnb_optimizers import build_bnb_optimizer

    return build_bnb_optimizer(name, groups, args, options, model)


def _fused_supported(param: torch.Tensor) -> bool:
    return param.device.type in ("cpu", "cuda", "mps", "xpu") and param.is_floating_point()


# -- schedules -----------------------------------------------------------------------------------------------------
def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float = 0.5, min_lr_rate: float = 0.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: int = 1) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def _polynomial(step: int, *, warmup: int, total: int, lr_init: float, lr_end: float = 1e-7,
                power: float = 1.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / (total - warmup)
    return ((lr_init - lr_end) * remaining ** power + lr_end) / lr_init


def _inverse_sqrt(step: int, *, warmup: int, timescale: int | None = None) -> float:
    timescale = timescale or (warmup or 10_000)
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _cosine_warmup_with_min_lr(step: int, *, warmup: int, total: int, num_cycles: float = 0.5,
                               min_lr_rate: float = 0.0, warmup_lr_rate: float | None = None) -> float:
    # the reference's variant: warmup reaches the peak on its last step, decay starts one step into the cosine
    if step < warmup:
        if warmup_lr_rate is None:
            return (step + 1) / max(1, warmup)
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * step / max(1, warmup - 1)
    progress = (step - warmup + 1) / max(1, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def _warmup_stable_decay(step: int, *, warmup: int, stable: int, decay: int, warmup_type: str = "linear",
                         decay_type: str = "cosine", min_lr_ratio: float = 0.0, num_cycles: float = 0.5) -> float:
    if step < warmup:
        progress = step / max(1, warmup)
        factor = {"linear": progress, "cosine": 0.5 * (1.0 - math.cos(math.pi * progress)),
                  "1-sqrt": 1.0 - math.sqrt(1.0 - progress)}[warmup_type]
    elif step < warmup + stable:
        return 1.0
    elif step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        factor = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)),
                  "1-sqrt": 1.0 - math.sqrt(progress)}[decay_type]
    else:
        return min_lr_ratio
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)


def _min_lr_rate(name: str, optimizer: torch.optim.Optimizer, kw: dict) -> dict:
    """min_lr (absolute) or min_lr_rate (a fraction of the peak) -> min_lr_rate; exactly one is required."""
    min_lr, rate = kw.pop("min_lr", None), kw.pop("min_lr_rate", None)
    if (min_lr is None) == (rate is None):
        raise ValueError(f"the {name!r} schedule needs exactly one of min_lr or min_lr_rate in lr_scheduler_kwargs "
                         f"(got {'both' if min_lr is not None else 'neither'})")
    return {**kw, "min_lr_rate": rate if rate is not None else min_lr / optimizer.defaults["lr"]}


def _wsd_kwargs(kw: dict, warmup: int, total: int | None) -> dict:
    if "num_decay_steps" not in kw:
        raise ValueError("the 'warmup_stable_decay' schedule needs num_decay_steps in lr_scheduler_kwargs")
    decay, stable = kw.pop("num_decay_steps"), kw.pop("num_stable_steps", None)
    if stable is None:
        if total is None:
            raise ValueError("the 'warmup_stable_decay' schedule needs num_training_steps or num_stable_steps")
        stable = total - warmup - decay
    for key in ("warmup_type", "decay_type"):
        if kw.get(key, "linear") not in _WSD_SHAPES:
            raise ValueError(f"warmup_stable_decay: {key}={kw[key]!r} is not one of {', '.join(_WSD_SHAPES)}")
    return {**kw, "stable": stable, "decay": decay}


def get_scheduler(name: str, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                  num_training_steps: int | None = None, scheduler_specific_kwargs: dict | None = None) -> LambdaLR:
    """The schedule `name` (an args.lr_scheduler_type value): a LambdaLR with the reference's formula, or for
    reduce_lr_on_plateau / greedy a schedule stepped with the evaluation metric (see steps_on_metrics)."""
    name = getattr(name, "value", name)
    kw = dict(scheduler_specific_kwargs or {})
    warmup = num_warmup_steps or 0
    if name == "constant":
        return LambdaLR(optimizer, _constant)
    if name == "reduce_lr_on_plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kw)
    if name == "greedy":
        return GreedyLR(optimizer, **kw)
    known = ("constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "greedy",
             "warmup_stable_decay", *_NEEDS_TOTAL)
    if name not in known:
        raise ValueError(f"lr_scheduler_type={name!r} is not supported; use one of {', '.join(known)}")
    if num_warmup_steps is None:
        raise ValueError(f"the {name!r} schedule needs num_warmup_steps")
    if name == "constant_with_warmup":
        return LambdaLR(optimizer, partial(_constant_with_warmup, warmup=warmup))
    if name == "inverse_sqrt":
        return LambdaLR(optimizer, partial(_inverse_sqrt, warmup=warmup, **kw))
    if name == "warmup_stable_decay":
        return LambdaLR(optimizer, partial(_warmup_stable_decay, warmup=warmup,
                                           **_wsd_kwargs(kw, warmup, num_training_steps)))
    if num_training_steps is None:
        raise ValueError(f"the {name!r} schedule needs num_training_steps")
    if name == "polynomial":
        lr_init = optimizer.defaults["lr"]
        lr_end = kw.get("lr_end", 1e-7)
        if lr_end >= lr_init:
            raise ValueError(f"polynomial schedule: lr_end ({lr_end}) must be smaller than the learning rate "
                             f"({lr_init})")
        kw["lr_init"] = lr_init
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        kw = _min_lr_rate(name, optimizer, kw)
    return LambdaLR(optimizer, partial(_NEEDS_TOTAL[name], warmup=warmup, total=num_training_steps, **kw))


# -- the reference's named schedule functions (each a LambdaLR with the formula get_scheduler uses) ---------------------
def get_constant_schedule(optimizer, last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, _constant, last_epoch)


def get_constant_schedule_with_warmup(optimizer, num_warmup_steps: int, last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, partial(_constant_with_warmup, warmup=num_warmup_steps), last_epoch)


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int,
                                    last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, partial(_linear, warmup=num_warmup_steps, total=num_training_steps), last_epoch)


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int,
                                    num_cycles: float = 0.5, last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, partial(_cosine, warmup=num_warmup_steps, total=num_training_steps,
                                       num_cycles=num_cycles), last_epoch)


def get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int,
                                                       num_cycles: int = 1, last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, partial(_cosine_with_restarts, warmup=num_warmup_steps, total=num_training_steps,
                                       num_cycles=num_cycles), last_epoch)


def get_polynomial_decay_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int,
                                              lr_end: float = 1e-7, power: float = 1.0,
                                              last_epoch: int = -1) -> LambdaLR:
    scheduler = get_scheduler("polynomial", optimizer, num_warmup_steps, num_training_steps,
                              {"lr_end": lr_end, "power": power})
    if last_epoch != -1:
        scheduler = LambdaLR(optimizer, scheduler.lr_lambdas[0], last_epoch)
    return scheduler


def get_inverse_sqrt_schedule(optimizer, num_warmup_steps: int, timescale: int | None = None,
                              last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, partial(_inverse_sqrt, warmup=num_warmup_steps, timescale=timescale), last_epoch)


def get_wsd_schedule(optimizer, num_warmup_steps: int, num_decay_steps: int, num_training_steps: int | None = None,
                     num_stable_steps: int | None = None, warmup_type: str = "linear", decay_type: str = "cosine",
                     min_lr_ratio: float = 0, num_cycles: float = 0.5, last_epoch: int = -1) -> LambdaLR:
    """Warmup (from min_lr_ratio of the peak), a stable peak, then decay back to min_lr_ratio; the stable phase lasts
    num_stable_steps, else what num_training_steps leaves after warmup and decay."""
    if num_training_steps is None and num_stable_steps is None:
        raise ValueError("get_wsd_schedule needs num_training_steps or num_stable_steps")
    kw = dict(num_decay_steps=num_decay_steps, num_stable_steps=num_stable_steps, warmup_type=warmup_type,
              decay_type=decay_type, min_lr_ratio=min_lr_ratio, num_cycles=num_cycles)
    return LambdaLR(optimizer, partial(_warmup_stable_decay, warmup=num_warmup_steps,
                                       **_wsd_kwargs(kw, num_warmup_steps, num_training_steps)), last_epoch)


def steps_on_metrics(scheduler) -> bool:
    """Whether the Trainer steps this schedule with the evaluation metric instead of after every optimizer step."""
    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))


_NEEDS_TOTAL = {"linear": _linear, "cosine": _cosine, "cosine_with_restarts": _cosine_with_restarts,
                "polynomial": _polynomial, "cosine_with_min_lr": _cosine,
                "cosine_warmup_with_min_lr": _cosine_warmup_with_min_lr}
