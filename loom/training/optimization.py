"""Optimizers (AdamW without decay on biases and norms, SGD, Adafactor) and learning-rate schedules.

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
    name = args.optim
    if name in ("adamw_torch", "adamw_torch_fused", "adamw"):
        fused = name == "adamw_torch_fused" and _fused_supported(trainable[0][1])
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 eps=args.adam_epsilon, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    if name == "adafactor":
        # torch's Adafactor with a fixed learning rate; the reference's Trainer also runs Adafactor with
        # relative_step=False and scale_parameter=False, i.e. the schedule drives the learning rate
        return torch.optim.Adafactor(groups, lr=args.learning_rate)
    raise ValueError(f"optim={name!r} is not supported")


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


def get_scheduler(name: str, optimizer: torch.optim.Optimizer, num_warmup_steps: int | None = None,
                  num_training_steps: int | None = None, scheduler_specific_kwargs: dict | None = None) -> LambdaLR:
    """A LambdaLR for the schedule `name` (linear, cosine, cosine_with_restarts, polynomial, constant,
    constant_with_warmup, inverse_sqrt)."""
    name = getattr(name, "value", name)
    kw = dict(scheduler_specific_kwargs or {})
    warmup = num_warmup_steps or 0
    if name == "constant":
        return LambdaLR(optimizer, _constant)
    if name in ("constant_with_warmup", "inverse_sqrt") or name in _NEEDS_TOTAL:
        if num_warmup_steps is None:
            raise ValueError(f"the {name!r} schedule needs num_warmup_steps")
    if name == "constant_with_warmup":
        return LambdaLR(optimizer, partial(_constant_with_warmup, warmup=warmup))
    if name == "inverse_sqrt":
        return LambdaLR(optimizer, partial(_inverse_sqrt, warmup=warmup, **kw))
    if name not in _NEEDS_TOTAL:
        raise ValueError(f"lr_scheduler_type={name!r} is not supported; use one of "
                         f"{', '.join(['constant', 'constant_with_warmup', 'inverse_sqrt', *_NEEDS_TOTAL])}")
    if num_training_steps is None:
        raise ValueError(f"the {name!r} schedule needs num_training_steps")
    if name == "polynomial":
        lr_init = optimizer.defaults["lr"]
        lr_end = kw.get("lr_end", 1e-7)
        if lr_end >= lr_init:
            raise ValueError(f"polynomial schedule: lr_end ({lr_end}) must be smaller than the learning rate "
                             f"({lr_init})")
        kw["lr_init"] = lr_init
    return LambdaLR(optimizer, partial(_NEEDS_TOTAL[name], warmup=warmup, total=num_training_steps, **kw))


_NEEDS_TOTAL = {"linear": _linear, "cosine": _cosine, "cosine_with_restarts": _cosine_with_restarts,
                "polynomial": _polynomial}
