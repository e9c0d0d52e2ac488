"""Trainer state, control flags and callbacks (progress bar, printing, early stopping, JSON lines, TensorBoard)."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("loom")

@dataclass
class TrainerState:
    """What the Trainer knows about the run; saved as trainer_state.json in the reference's format."""

    epoch: float | None = None
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, Any] | None = None
    stateful_callbacks: dict[str, Any] = field(default_factory=dict)

    def to_json_string(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save_to_json(self, json_path: str | Path) -> None:
        from loom.utils import atomic_write_text

        atomic_write_text(Path(json_path), self.to_json_string())

    def compute_steps(self, args, max_steps: int) -> None:
        """logging/eval/save_steps from args; an interval below 1 is that share of max_steps, rounded up."""
        for kind in ("logging", "eval", "save"):
            steps = getattr(args, f"{kind}_steps")
            if steps is not None:
                setattr(self, f"{kind}_steps", math.ceil(max_steps * steps) if steps < 1 else int(steps))

    @classmethod
    def load_from_json(cls, json_path: str | Path) -> "TrainerState":
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class ExportableState:
    """A callback (or the control flags) whose state goes into trainer_state.json's `stateful_callbacks` at each
    checkpoint and is restored on resume, in the reference's format: {"args": constructor arguments, "attributes":
    the mutable state}."""

    def state(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement state() to be saved in checkpoints")

    def load_state(self, state: dict) -> None:
        """Restore the saved attributes in place (the constructor arguments of this run are kept)."""
        for name, value in state.get("attributes", {}).items():
            setattr(self, name, value)

    @classmethod
    def from_state(cls, state: dict):
        instance = cls(**state.get("args", {}))
        instance.load_state(state)
        return instance


@dataclass
class TrainerControl(ExportableState):
    """Flags callbacks set to steer the loop; the Trainer resets the per-step ones after acting on them."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_step(self) -> None:
        self.should_save = self.should_evaluate = self.should_log = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_training(self) -> None:
        self.should_training_stop = False

    def state(self) -> dict:
        return {"args": dataclasses.asdict(self), "attributes": {}}

    def load_state(self, state: dict) -> None:
        for name, value in state.get("args", {}).items():
            setattr(self, name, value)


class TrainerCallback:
    """Override any of these events; each receives (args, state, control, **kwargs) and may return a control."""

    def on_init_end(self, args, state, control, **kwargs): pass
    def on_train_begin(self, args, state, control, **kwargs): pass
    def on_train_end(self, args, state, control, **kwargs): pass
    def on_epoch_begin(self, args, state, control, **kwargs): pass
    def on_epoch_end(self, args, state, control, **kwargs): pass
    def on_step_begin(self, args, state, control, **kwargs): pass
    def on_pre_optimizer_step(self, args, state, control, **kwargs): pass
    def on_optimizer_step(self, args, state, control, **kwargs): pass
    def on_substep_end(self, args, state, control, **kwargs): pass
    def on_step_end(self, args, state, control, **kwargs): pass
    def on_evaluate(self, args, state, control, **kwargs): pass
    def on_predict(self, args, state, control, **kwargs): pass
    def on_save(self, args, state, control, **kwargs): pass
    def on_log(self, args, state, control, **kwargs): pass
    def on_prediction_step(self, args, state, control, **kwargs): pass
    def on_push_begin(self, args, state, control, **kwargs): pass


class CallbackHandler:
    """Calls every callback for an event and threads the control object through them."""

    def __init__(self, callbacks, model, processing_class, optimizer, lr_scheduler) -> None:
        self.callbacks: list[TrainerCallback] = []
        for cb in callbacks:
            self.add_callback(cb)
        self.model, self.processing_class = model, processing_class
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.train_dataloader = self.eval_dataloader = None
        if not any(isinstance(cb, DefaultFlowCallback) for cb in self.callbacks):
            logger.warning("these callbacks have no DefaultFlowCallback, so nothing will decide when to log, evaluate, "
                           f"save or stop: add one (trainer.add_callback(DefaultFlowCallback)). Callbacks:\n"
                           f"{self.callback_list}")

    def add_callback(self, callback) -> None:
        cb = callback() if isinstance(callback, type) else callback
        if not isinstance(cb, TrainerCallback):
            raise TypeError(f"callbacks must be TrainerCallback instances or classes, got {type(cb).__name__}")
        if any(type(other) is type(cb) for other in self.callbacks):
            logger.warning(f"adding a second {type(cb).__name__} to the callbacks (each event reaches both). "
                           f"Callbacks:\n{self.callback_list}")
        self.callbacks.append(cb)

    @property
    def callback_list(self) -> str:
        return "\n".join(type(cb).__name__ for cb in self.callbacks)

    def __getattr__(self, name: str):
        """`handler.on_log(args, state, control, ...)`: each event as a method, as the reference's handler has."""
        if name.startswith("on_") and hasattr(TrainerCallback, name):
            return functools.partial(self.call, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def pop_callback(self, callback):
        for cb in self.callbacks:
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback) -> None:
        self.pop_callback(callback)

    def call(self, event: str, args, state, control, **kwargs) -> TrainerControl:
        for cb in self.callbacks:
            result = getattr(cb, event)(args, state, control, model=self.model, processing_class=self.processing_class,
                                        optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                                        train_dataloader=self.train_dataloader, eval_dataloader=self.eval_dataloader,
                                        **kwargs)
            if result is not None:
                control = result
        return control

    call_event = call  # the reference's name


class ProgressCallback(TrainerCallback):
    """A tqdm progress bar over optimizer steps, with the latest logs in its postfix."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # one bar per run, on its first process
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True, desc="train")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            self.bar.set_postfix({k: _short(v) for k, v in logs.items() if k in ("loss", "learning_rate", "eval_loss")},
                                 refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value


class PrinterCallback(TrainerCallback):
    """Prints each log dict (used when the progress bar is disabled)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_local_process_zero:  # once per machine under torchrun, as the reference
            # one write per line (print writes the newline separately), so that under torchrun another process's
            # output cannot land inside it
            sys.stdout.write(f"{ {k: _short(v) for k, v in logs.items()} }\n")
            sys.stdout.flush()


class JsonLinesLoggerCallback(TrainerCallback):
    """Appends every log dict, with its step, as one JSON line to output_dir/logs.jsonl (or `path`)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        path = self.path or Path(args.output_dir or ".") / "logs.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class TensorBoardCallback(TrainerCallback):
    """Writes scalar logs to TensorBoard event files under output_dir/runs (needs the tensorboard package)."""

    def __init__(self, log_dir: str | Path | None = None) -> None:
        from loom.utils import require

        require("tensorboard", "TensorBoardCallback")
        self.log_dir = log_dir
        self.writer = None

    def on_train_begin(self, args, state, control, **kwargs):
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None and state.is_world_process_zero:
            self.writer = SummaryWriter(log_dir=str(self.log_dir or Path(args.output_dir or ".") / "runs"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.writer is None or not logs:
            return
        for key, value in logs.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key if key.startswith("eval_") else f"train/{key}", value, state.global_step)
        self.writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stop training when metric_for_best_model has not improved by more than a threshold for `patience` evals.

    The count of evaluations without improvement is saved in checkpoints, so a resumed run stops where the
    uninterrupted one would.
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0) -> None:
        if early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1, got {early_stopping_patience}")
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        self.early_stopping_patience_counter = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if args.metric_for_best_model is None:
            raise ValueError("EarlyStoppingCallback needs args.metric_for_best_model (the metric to watch)")
        if args.eval_strategy == "no":
            raise ValueError("EarlyStoppingCallback needs evaluations; set eval_strategy to 'steps' or 'epoch'")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = args.metric_for_best_model
        key = name if name.startswith("eval_") else f"eval_{name}"
        value = (metrics or {}).get(key)
        if value is None:
            raise KeyError(f"EarlyStoppingCallback: metric {key!r} is not in the evaluation metrics "
                           f"{sorted(metrics or {})}")
        self.check_metric_value(args, state, control, value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def check_metric_value(self, args, state, control, metric_value) -> None:
        """Reset the patience counter when `metric_value` beats state.best_metric by more than the threshold (in
        the direction args.greater_is_better says), else count one more evaluation without improvement."""
        best = state.best_metric
        better = best is None or math.isnan(best) or (
            metric_value - best > self.early_stopping_threshold if args.greater_is_better
            else best - metric_value > self.early_stopping_threshold)
        self.early_stopping_patience_counter = 0 if better else self.early_stopping_patience_counter + 1

    def state(self) -> dict:
        return {"args": {"early_stopping_patience": self.early_stopping_patience,
                         "early_stopping_threshold": self.early_stopping_threshold},
                "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter}}


class DefaultFlowCallback(TrainerCallback):
    """Decides when to log, evaluate, save and stop, from the interval arguments (always installed first)."""

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == "steps" and step % state.logging_steps == 0:
            control.should_log = True
        delay_over = args.eval_delay <= step
        if args.eval_strategy == "steps" and step % state.eval_steps == 0 and delay_over:
            control.should_evaluate = True
        if args.save_strategy == "steps" and step % state.save_steps == 0:
            control.should_save = True
        if step >= state.max_steps:
            control.should_training_stop = True
            # the final model is always evaluated and saved under a step-based strategy, even off the interval
            if args.eval_strategy == "steps" and delay_over:
                control.should_evaluate = True
            if args.save_strategy == "steps":
                control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.logging_strategy == "epoch":
            control.should_log = True
        if args.eval_strategy == "epoch" and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if args.save_strategy == "epoch":
            control.should_save = True
        return control
