"""GreedyLR: the reference's metric-driven schedule (lr_scheduler_type="greedy", arXiv:2512.14527).

Like ReduceLROnPlateau it is stepped with an evaluation metric, but it also raises the rate: more than `patience`
improving evaluations in a row divide every group's rate by `factor` (capped at max_lr), more than `patience`
non-improving ones multiply it by `factor` (floored at min_lr). A raise is followed by `warmup` evaluations and a cut
by `cooldown` evaluations in which nothing changes. With smooth=True the metric is first averaged over the last
`window_size` evaluations. Once `reset_start` cuts in a row have found every group at its floor, everything starts
again from the initial rates.
"""
from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger("loom")


def _per_group(value, groups: int, name: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(f"GreedyLR {name}: {len(value)} values for {groups} parameter groups; give one per group "
                             "or a single number")
        return list(value)
    return [value] * groups


class GreedyLR:
    """See the module docstring; arguments and defaults are the reference's."""

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str = "min", factor: float = 0.95, patience: int = 10,
                 threshold: float = 1e-6, threshold_mode: str = "abs", cooldown: int = 0, warmup: int = 0,
                 min_lr: float | list[float] = 1e-3, max_lr: float | list[float] = 1.0, eps: float = 1e-8,
                 verbose: bool = False, smooth: bool = False, window_size: int = 50, reset_start: int = 500) -> None:
        if factor >= 1.0:
            raise ValueError(f"GreedyLR factor must be below 1 (it multiplies the rate on a plateau), got {factor}")
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError(f"GreedyLR: mode must be 'min' or 'max' and threshold_mode 'rel' or 'abs', got "
                             f"mode={mode!r}, threshold_mode={threshold_mode!r}")
        self.optimizer = optimizer
        self.mode, self.factor, self.patience, self.eps, self.verbose = mode, factor, patience, eps, verbose
        self.threshold, self.threshold_mode = threshold, threshold_mode
        self.cooldown, self.warmup = cooldown, warmup
        self.smooth, self.window_size, self.reset_start = smooth, window_size, reset_start
        groups = len(optimizer.param_groups)
        self.min_lrs, self.max_lrs = _per_group(min_lr, groups, "min_lr"), _per_group(max_lr, groups, "max_lr")
        self.initial_lrs = [group["lr"] for group in optimizer.param_groups]
        self._last_lr = list(self.initial_lrs)
        self.last_epoch = 0
        self._restart()

    def _restart(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad, self.num_good, self.cooldown_left, self.warmup_left = 0, 0, 0, 0
        self.cuts_left = self.reset_start
        self.window: list[float] = []
        self.window_sum = 0.0

    def _smoothed(self, value: float) -> float:
        # a running sum, as the reference keeps it, so the averages agree to the last bit
        self.window.append(value)
        self.window_sum += value
        if len(self.window) > self.window_size:
            self.window_sum -= self.window.pop(0)
        return self.window_sum / len(self.window)

    def is_better(self, value: float, best: float) -> bool:
        sign = -1 if self.mode == "min" else 1
        # rel scales the best value (still infinite before the first evaluation); abs shifts it
        bar = best * (1 + sign * self.threshold) if self.threshold_mode == "rel" else best + sign * self.threshold
        return value < bar if self.mode == "min" else value > bar

    def step(self, metrics: float, epoch: int | None = None) -> None:
        value = self._smoothed(float(metrics)) if self.smooth else float(metrics)
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        if self.cooldown_left or self.warmup_left:
            if self.cooldown_left:
                self.cooldown_left -= 1
            else:
                self.warmup_left -= 1
            self.num_bad = self.num_good = 0
        else:
            if self.is_better(value, self.best):
                self.best, self.num_bad, self.num_good = value, 0, self.num_good + 1
            else:
                self.num_bad, self.num_good = self.num_bad + 1, 0
            if self.num_good > self.patience:
                self._raise()
                self.warmup_left, self.num_good = self.warmup, 0
            elif self.num_bad > self.patience:
                self._cut()
                self.cooldown_left, self.num_bad = self.cooldown, 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _move(self, i: int, group: dict, new: float, up: bool) -> None:
        """Set a group's rate if it moves by more than eps in the intended direction (a rate already outside
        [min_lr, max_lr] is not pulled back in)."""
        change = new - float(group["lr"]) if up else float(group["lr"]) - new
        if change > self.eps:
            group["lr"] = new
            if self.verbose:
                logger.info("GreedyLR: evaluation %d: learning rate of group %d %s to %.4e", self.last_epoch, i,
                            "raised" if up else "lowered", new)

    def _raise(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            self._move(i, group, min(float(group["lr"]) / self.factor, self.max_lrs[i]), up=True)
        self.cuts_left = self.reset_start

    def _cut(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            self._move(i, group, max(float(group["lr"]) * self.factor, self.min_lrs[i]), up=False)
        if all(group["lr"] <= low for group, low in zip(self.optimizer.param_groups, self.min_lrs)):
            self.cuts_left -= 1
            if self.cuts_left <= 0:
                for group, lr in zip(self.optimizer.param_groups, self.initial_lrs):
                    group["lr"] = lr
                self._restart()

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
