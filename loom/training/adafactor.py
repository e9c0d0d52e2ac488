"""Adafactor (Shazeer & Stern, 2018) with the reference's options and update rule, so that its steps and checkpoints of
optimizer state carry over; `AdafactorSchedule` reports the learning rate it picks for itself.

A matrix's second moment is kept factored (a running mean per row and per column, outer-producted back), a vector's
in full. The step size is either `lr` or, with relative_step, min(1e-2, 1/sqrt(step)) (warmup_init: 1e-6 * step),
times the parameter's RMS with scale_parameter. Updates are clipped to an RMS of clip_threshold."""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / math.sqrt(t.numel())


class Adafactor(Optimizer):
    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False) -> None:
        if lr is not None and relative_step:
            raise ValueError(f"Adafactor: lr={lr} and relative_step=True both set the step size; pass "
                             "relative_step=False to use lr (the Trainer does), or drop lr")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True warms up the relative step, so it needs relative_step=True")
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                                      relative_step=relative_step, warmup_init=warmup_init))

    @staticmethod
    def _get_lr(group: dict, state: dict) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            lr = min(1e-6 * state["step"] if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(state["step"]))
        return lr * (max(group["eps"][1], state["RMS"]) if group["scale_parameter"] else 1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients; use a dense embedding (sparse=False)")
        grad = p.grad.float() if p.grad.dtype in (torch.float16, torch.bfloat16) else p.grad
        factored, momentum = grad.dim() >= 2, group["beta1"] is not None
        state = self.state[p]
        if not state:
            state["step"] = 0
            if momentum:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0
        else:  # state loaded from a checkpoint may sit on another device or dtype
            for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(grad)
        weights = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        state["step"] += 1
        state["RMS"] = _rms(weights)
        lr = self._get_lr(group, state)
        beta2 = 1.0 - math.pow(state["step"], group["decay_rate"])
        squared = grad * grad + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1.0 - beta2)
            col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1.0 - beta2)
            # 1/sqrt of the second moment rebuilt from its row and column means: (row / mean(row)) x col
            update = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()
            update.mul_(grad)
        else:
            state["exp_avg_sq"].mul_(beta2).add_(squared, alpha=1.0 - beta2)
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr)
        if momentum:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
        if group["weight_decay"] != 0:
            weights.add_(weights, alpha=-group["weight_decay"] * lr)
        weights.add_(-update)
        if weights is not p:
            p.copy_(weights)


class AdafactorSchedule(LambdaLR):
    """A stand-in scheduler for a Trainer run with Adafactor's own (relative) step size: get_lr() returns the rate
    Adafactor used at its last step (initial_lr before the first), so that logs show it."""

    def __init__(self, optimizer: Optimizer, initial_lr: float = 0.0) -> None:
        def constant(_):
            return initial_lr

        for group in optimizer.param_groups:
            group["initial_lr"] = initial_lr
        super().__init__(optimizer, constant)
        for group in optimizer.param_groups:
            del group["initial_lr"]

    def get_lr(self) -> list[float]:
        opt = self.optimizer
        rates = [opt._get_lr(group, opt.state[group["params"][0]]) for group in opt.param_groups
                 if group["params"][0].grad is not None]
        return rates or self.base_lrs
