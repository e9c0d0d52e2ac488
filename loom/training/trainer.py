"""Trainer: the training loop, evaluation and prediction, checkpoints that resume exactly.

One optimizer step consumes a window of `gradient_accumulation_steps` micro-batches (the last window of an epoch may
be shorter). The window's batches are fetched first, the number of loss items (target tokens or examples) is counted
over the whole window, and each micro-batch's loss is divided by that count, so the accumulated gradient equals the
gradient of one big batch. The pieces a distributed run changes (sampler, gradient sync, item counting, model
wrapping, clipping) are small methods that subclasses override.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from loom.adapters import unwrap_peft
from loom.distributed.trainer import ParallelTrainerMixin
from loom.training import checkpoints as ckpt
from loom.training.arguments import TrainingArguments, steps_from
from loom.training.callbacks import (CallbackHandler, DefaultFlowCallback, JsonLinesLoggerCallback, PrinterCallback,
                                     ProgressCallback, TensorBoardCallback, TrainerControl, TrainerState)
from loom.training.collators import DataCollatorWithPadding, default_data_collator
from loom.training.data import (LABEL_ALIASES, EpochSampler, RemoveColumnsCollator, as_dataset, check_batch,
                                is_hf_dataset, model_input_names, move_to, prepare_hf_dataset)
from loom.training.optimization import create_optimizer, get_scheduler
from loom.training.seed import set_seed
from loom.training.trainer_checkpoints import CheckpointMixin
from loom.training.trainer_eval import EvaluationMixin


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]


class Trainer(EvaluationMixin, CheckpointMixin):
    """Train, evaluate and predict with a model; the reference's constructor arguments and methods.

    Under torchrun, or with tp_size/cp_size/fsdp set in the arguments, `Trainer(...)` builds a `ParallelTrainer`
    (below), so one script runs with `python` and with `torchrun`.
    """

    def __new__(cls, *args, **kwargs):
        if cls is Trainer:
            targs = kwargs.get("args", args[1] if len(args) > 1 else None)
            if targs is not None and getattr(targs, "wants_parallel", False):
                return super().__new__(ParallelTrainer)
        return super().__new__(cls)

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None,
                 data_collator: Callable | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init: Callable | None = None, compute_loss_func: Callable | None = None,
                 compute_metrics: Callable | None = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), preprocess_logits_for_metrics: Callable | None = None) -> None:
        self.args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        if model is None and model_init is None:
            raise ValueError("Trainer needs a model (or a model_init function that builds one)")
        self.model_init = model_init
        if model is None:
            set_seed(self.args.seed)
            model = self._call_model_init()
        self.model = model.to(self.args.device)
        self.train_dataset = as_dataset(train_dataset, "train_dataset")
        self.eval_dataset = eval_dataset if isinstance(eval_dataset, dict) else as_dataset(eval_dataset,
                                                                                           "eval_dataset")
        self.processing_class = processing_class
        if data_collator is None:
            data_collator = DataCollatorWithPadding(processing_class) if hasattr(processing_class, "pad") \
                else default_data_collator
        self.data_collator = data_collator
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        if model_init is not None and (self.optimizer is not None or self.lr_scheduler is not None):
            raise ValueError("optimizers=(...) cannot be combined with model_init: each new model needs its own "
                             "optimizer; override create_optimizer instead")
        self.label_names = self.args.label_names if self.args.label_names is not None else \
            _default_label_names(self.model)
        self._accepts_num_items = "num_items_in_batch" in (model_input_names(self.model) or set())
        self._shifts_labels = self._accepts_num_items or _is_causal_lm(self.model)
        self.scaler = torch.amp.GradScaler(self.args.device.type) if self.args.fp16 else None
        self.state = TrainerState()
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler(self._default_callbacks() + list(callbacks or []), self.model,
                                                processing_class, self.optimizer, self.lr_scheduler)
        self.hp_search_backend = None
        self._forward_model: nn.Module = self.model
        self.control = self.callback_handler.call("on_init_end", self.args, self.state, self.control)

    def _default_callbacks(self) -> list:
        cbs: list = [DefaultFlowCallback(), PrinterCallback() if self.args.disable_tqdm else ProgressCallback()]
        if "jsonl" in self.args.report_to:
            cbs.append(JsonLinesLoggerCallback())
        if "tensorboard" in self.args.report_to:
            cbs.append(TensorBoardCallback())
        return cbs

    def _call_model_init(self, trial=None) -> nn.Module:
        import inspect

        takes_trial = len(inspect.signature(self.model_init).parameters) == 1
        model = self.model_init(trial) if takes_trial else self.model_init()
        if model is None:
            raise ValueError("model_init returned None; it must return a model")
        return model

    # -- callbacks -----------------------------------------------------------------------------------------------
    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    def _event(self, name: str, **kwargs) -> None:
        self.control = self.callback_handler.call(name, self.args, self.state, self.control, **kwargs)

    # -- data ----------------------------------------------------------------------------------------------------
    def _collator_for(self, model: nn.Module) -> Callable:
        if not self.args.remove_unused_columns:
            return self.data_collator
        names = model_input_names(model)
        return self.data_collator if names is None else RemoveColumnsCollator(self.data_collator, names |
                                                                              set(self.label_names))

    def _prepare_dataset(self, dataset, name: str):
        """A `datasets.Dataset` drops the columns the model's forward cannot take (through its own column API) and
        yields torch tensors; other datasets pass through (the collator drops their unused fields)."""
        if not is_hf_dataset(dataset):
            return dataset
        names = model_input_names(self.model) if self.args.remove_unused_columns else None
        keep = None if names is None else names | set(self.label_names) | set(LABEL_ALIASES)
        return prepare_hf_dataset(dataset, keep, name)

    def _parallel_sizes(self) -> tuple[int, int]:
        """(world size, data-parallel ranks: those that draw different samples); a distributed subclass overrides."""
        return 1, 1

    def _train_sampler(self, dataset) -> EpochSampler:
        """The training order; a distributed subclass returns a sampler that shards it."""
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSampler(len(dataset), seed)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise TypeError("loom's Trainer trains on map-style datasets (with __len__ and __getitem__) so that runs "
                            "resume exactly; materialise the iterable dataset as a list first")
        dataset = self._prepare_dataset(self.train_dataset, "train_dataset")
        return self._loader(dataset, self.args.train_batch_size, self._train_sampler(dataset),
                            self.args.dataloader_drop_last)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = as_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (given to the Trainer or to evaluate)")
        return self._loader(self._prepare_dataset(dataset, "eval_dataset"), self.args.eval_batch_size, None, False)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        dataset = self._prepare_dataset(as_dataset(test_dataset, "test_dataset"), "test_dataset")
        return self._loader(dataset, self.args.eval_batch_size, None, False)

    def _loader(self, dataset, batch_size: int, sampler, drop_last: bool) -> DataLoader:
        generator = torch.Generator()  # keeps DataLoader from drawing its worker seed off the global RNG
        generator.manual_seed(self.args.seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self._collator_for(self.model),
                          num_workers=self.args.dataloader_num_workers, drop_last=drop_last, generator=generator,
                          # pinning on the main thread (no workers) costs more per step than it saves
                          pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda"
                          and self.args.dataloader_num_workers > 0)

    # -- optimizer and schedule ----------------------------------------------------------------------------------
    def create_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model, self.args)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(self.args.lr_scheduler_type, optimizer or self.optimizer,
                                              num_warmup_steps=self.args.warmup_steps_for(num_training_steps),
                                              num_training_steps=num_training_steps,
                                              scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_optimizer()
        self.create_scheduler(num_training_steps, self.optimizer)
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler

    # -- loss ----------------------------------------------------------------------------------------------------
    def count_loss_items(self, batches: list[dict]) -> torch.Tensor | int | None:
        """What the losses of one optimizer step are normalised by: target tokens for token-level labels (after the
        causal shift when the model shifts), examples for sequence-level labels, None without labels. A distributed
        subclass sums this over ranks."""
        labels = [b.get("labels") for b in batches]
        if any(lab is None for lab in labels):
            return None
        return sum(_loss_items(lab, self._shifts_labels) for lab in labels)

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The micro-batch loss, already divided by the item count of the whole accumulated batch when given."""
        labels = inputs.get("labels")
        if self.compute_loss_func is not None:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif num_items_in_batch is None or labels is None:
            outputs = model(**inputs)
            loss = _loss_of(outputs)
        elif self._accepts_num_items:
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
            loss = _loss_of(outputs)
        else:
            # the model's own loss (a mean over this batch's items, shifted or not as the model defines it),
            # re-weighted to a mean over the accumulated batch's items
            outputs = model(**inputs)
            loss = _loss_of(outputs)
            here = _loss_items(labels, self._shifts_labels)
            if bool(here != num_items_in_batch):
                loss = loss * (here / num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None,
                      num_micro_batches: int = 1) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the detached loss."""
        with self.autocast():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is None and num_micro_batches > 1:
            loss = loss / num_micro_batches
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def autocast(self):
        if self.args.bf16 or self.args.fp16:
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16
            return torch.autocast(self.args.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def gradient_sync(self, is_last_micro_batch: bool):
        """Context for one micro-batch's backward; a data-parallel subclass skips the gradient all-reduce until the
        last micro-batch of a window."""
        return contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor | None:
        """Clip to args.max_grad_norm; returns the total gradient norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return None
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else math.inf
        return nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    # -- training ------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs) -> TrainOutput:
        """Train from scratch or resume exactly from a checkpoint (True = the latest in output_dir)."""
        if kwargs:
            raise TypeError(f"train() got unexpected arguments {sorted(kwargs)}")
        args = self.args
        resume = self._resolve_checkpoint(resume_from_checkpoint if resume_from_checkpoint is not None
                                          else args.resume_from_checkpoint)
        if resume is None:
            set_seed(args.seed)
        if self.model_init is not None and trial is not None:
            self.model = self._call_model_init(trial).to(args.device)
            self.optimizer = self.lr_scheduler = None
            self.callback_handler.model = self.model
        if args.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable()
        loader = self.get_train_dataloader()
        num_batches = len(loader)
        if num_batches == 0:
            raise ValueError(f"the training dataset yields no batches ({len(self.train_dataset)} examples, batch size "
                             f"{args.train_batch_size}, drop_last={args.dataloader_drop_last})")
        ga = args.gradient_accumulation_steps
        steps_per_epoch = math.ceil(num_batches / ga)
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        self._preflight(loader.dataset)
        self.create_optimizer_and_scheduler(max_steps)
        self.state = TrainerState(
            max_steps=max_steps, train_batch_size=args.train_batch_size,
            num_train_epochs=math.ceil(max_steps / steps_per_epoch),
            logging_steps=steps_from(args.logging_steps, max_steps),
            eval_steps=steps_from(args.eval_steps, max_steps) or steps_from(args.logging_steps, max_steps),
            save_steps=steps_from(args.save_steps, max_steps), is_hyper_param_search=trial is not None)
        self.control = TrainerControl()  # a stop requested in an earlier train() does not carry over
        world, dp = self._parallel_sizes()
        self._data_shape = {"num_examples": len(self.train_dataset), "num_batches": num_batches,
                            "steps_per_epoch": steps_per_epoch, "train_batch_size": args.train_batch_size,
                            "gradient_accumulation_steps": ga, "world_size": world, "data_parallel_size": dp,
                            "global_batch_size": args.train_batch_size * ga * dp, "data_seed": loader.sampler.seed,
                            "dataloader_drop_last": args.dataloader_drop_last}
        self._pending_loss = torch.zeros((), device=args.device)
        self._pending_steps = 0
        rng = None
        if resume is not None:
            rng = self._load_checkpoint(resume)
        self._forward_model = self.wrap_model(self.model)
        return self._inner_loop(loader, steps_per_epoch, rng)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: compiled when asked; a distributed subclass wraps it further."""
        return torch.compile(model) if self.args.torch_compile else model

    def _inner_loop(self, loader: DataLoader, steps_per_epoch: int, rng: dict | None) -> TrainOutput:
        args, state = self.args, self.state
        ga = args.gradient_accumulation_steps
        num_batches = len(loader)
        self.callback_handler.train_dataloader = loader
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        self._last_log_time, self._last_log_step = start, state.global_step
        first_step = state.global_step
        total_loss = 0.0
        # a resumed run trains to the max_steps / num_train_epochs passed now (as the reference): a stop that ended
        # the checkpoint's run does not end this one
        self.control.should_training_stop = False
        self._event("on_train_begin")
        for epoch in self._epochs_to_train(steps_per_epoch):
            done_in_epoch = state.global_step - epoch * steps_per_epoch
            if done_in_epoch == 0:
                self.control.should_epoch_stop = False
            loader.sampler.set_epoch(epoch, skip=done_in_epoch * ga * args.train_batch_size)
            batches = iter(loader)
            if rng is not None:
                ckpt.set_rng_state(rng)  # after the iterator exists, exactly where the checkpoint was taken
                rng = None
            self._event("on_epoch_begin")
            remaining = num_batches - done_in_epoch * ga
            while remaining > 0 and not (self.control.should_epoch_stop or self.control.should_training_stop):
                window = [next(batches) for _ in range(min(ga, remaining))]
                remaining -= len(window)
                self._event("on_step_begin")
                loss = self._optimizer_step_on(window)
                self._pending_loss += loss
                self._pending_steps += 1
                state.global_step += 1
                state.epoch = epoch + (num_batches - remaining) / num_batches
                self._event("on_step_end")
                total_loss += self._maybe_log_save_evaluate()
            self._event("on_epoch_end")
            total_loss += self._maybe_log_save_evaluate()
            self.control.should_epoch_stop = False
            if self.control.should_training_stop:
                break
        return self._finish_training(start, first_step, total_loss)

    def _epochs_to_train(self, steps_per_epoch: int) -> range:
        state = self.state
        if state.global_step >= state.max_steps:
            if state.global_step > state.max_steps:
                warnings.warn(f"the checkpoint resumed is at step {state.global_step}, past max_steps="
                              f"{state.max_steps} (num_train_epochs={self.args.num_train_epochs}); nothing to train. "
                              "Pass a larger max_steps or num_train_epochs to train on", stacklevel=4)
            return range(0)
        return range(state.global_step // steps_per_epoch, state.num_train_epochs)

    def _optimizer_step_on(self, window: list[dict]) -> torch.Tensor:
        """One optimizer step over a window of micro-batches; returns the window's (normalised) loss."""
        device = self.args.device
        window = [move_to(b, device) for b in window]
        num_items = self.count_loss_items(window)
        if torch.is_tensor(num_items):
            num_items = num_items.to(device)
        loss = torch.zeros((), device=device)
        for i, batch in enumerate(window):
            with self.gradient_sync(i == len(window) - 1):
                loss += self.training_step(self._forward_model, batch, num_items, len(window))
            if i < len(window) - 1:
                self._event("on_substep_end")
        self._grad_norm = self.clip_gradients()
        self._event("on_pre_optimizer_step")
        self.optimizer_step()
        self._event("on_optimizer_step")
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _maybe_log_save_evaluate(self) -> float:
        """Act on the control flags; returns the loss sum that was logged (for the run's mean training loss)."""
        logged = 0.0
        if self.control.should_log and self._pending_steps:
            logged = self._pending_loss.item()
            now = time.perf_counter()
            steps = self.state.global_step - self._last_log_step
            logs = {"loss": logged / self._pending_steps, "learning_rate": self.lr_scheduler.get_last_lr()[0]}
            if self._grad_norm is not None:
                logs["grad_norm"] = float(self._grad_norm)
            if steps and now > self._last_log_time:
                logs["steps_per_second"] = steps / (now - self._last_log_time)
            self._last_log_time, self._last_log_step = now, self.state.global_step
            self._pending_loss = torch.zeros((), device=self.args.device)
            self._pending_steps = 0
            self.log(logs)
        if self.control.should_evaluate:
            self._evaluate_all()
            if self.args.save_strategy == "best" and self.state.best_global_step == self.state.global_step:
                self.control.should_save = True
        if self.control.should_save:
            self._save_checkpoint()
            self._event("on_save")
        self.control._new_step()
        return logged

    def _evaluate_all(self) -> dict[str, float]:
        if isinstance(self.eval_dataset, dict):
            metrics = {}
            for name, dataset in self.eval_dataset.items():
                metrics.update(self.evaluate(dataset, metric_key_prefix=f"eval_{name}"))
        else:
            metrics = self.evaluate()
        self._update_best(metrics)
        return metrics

    def _metric_key(self) -> str:
        name = self.args.metric_for_best_model
        return name if name.startswith("eval_") else f"eval_{name}"

    def _update_best(self, metrics: dict) -> None:
        if self.args.metric_for_best_model is None:
            return
        key = self._metric_key()
        if key not in metrics:
            raise KeyError(f"metric_for_best_model={self.args.metric_for_best_model!r}: {key!r} is not among the "
                           f"evaluation metrics {sorted(metrics)}; make compute_metrics return it or pick another")
        value = metrics[key]
        best = self.state.best_metric
        better = best is None or (value > best if self.args.greater_is_better else value < best)
        if better:
            self.state.best_metric, self.state.best_global_step = value, self.state.global_step

    def _finish_training(self, start: float, first_step: int, total_loss: float) -> TrainOutput:
        runtime = time.perf_counter() - start
        steps = self.state.global_step - first_step
        if self._pending_steps:
            total_loss += self._pending_loss.item()
        metrics = {"train_runtime": runtime, "train_steps_per_second": steps / runtime if runtime else 0.0,
                   "train_samples_per_second": steps * self.args.train_batch_size *
                   self.args.gradient_accumulation_steps / runtime if runtime else 0.0,
                   "train_loss": total_loss / max(1, steps), "epoch": self.state.epoch}
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_model_weights(Path(self.state.best_model_checkpoint))
        self.log(metrics)
        self._event("on_train_end")
        self.model.eval()
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def log(self, logs: dict[str, float]) -> None:
        """Record logs in state.log_history (with epoch and step) and hand them to the callbacks."""
        if self.state.epoch is not None:
            logs = {**logs, "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._event("on_log", logs=logs)

    # -- checks before the first step ----------------------------------------------------------------------------
    def _preflight(self, dataset) -> None:
        """Collate the first batch (RNG untouched) and check it, and compute_metrics' keys, before training."""
        n = min(len(dataset), self.args.train_batch_size)
        with _preserved_rng():
            batch = self._collator_for(self.model)([dataset[i] for i in range(n)])
            check_batch(batch, "first training")
            needs_labels = self.compute_loss_func is None and type(self).compute_loss is Trainer.compute_loss
            if needs_labels and self.label_names and not any(k in batch for k in self.label_names):
                raise ValueError(f"the training batches have no labels (looked for {self.label_names}, found "
                                 f"{sorted(batch)}), so the model computes no loss; add a 'labels' (or 'label') "
                                 "field to the dataset, use a collator that makes labels, or set label_names")
            if self.args.metric_for_best_model is not None and self.args.eval_strategy != "no":
                self._check_best_metric_available()

    def _check_best_metric_available(self) -> None:
        if self.eval_dataset is None:
            raise ValueError(f"eval_strategy={self.args.eval_strategy!r} needs an eval_dataset")
        if self._metric_key().removeprefix("eval_") == "loss":
            return
        if self.compute_metrics is None:
            raise ValueError(f"metric_for_best_model={self.args.metric_for_best_model!r} needs compute_metrics to "
                             "return it, but no compute_metrics was given")
        dataset = self.eval_dataset if not isinstance(self.eval_dataset, dict) else \
            next(iter(self.eval_dataset.values()))
        dataset = self._prepare_dataset(dataset, "eval_dataset")
        sample = [dataset[i] for i in range(min(len(dataset), self.args.eval_batch_size))]
        was_training = self.model.training
        out = self.evaluation_loop([self._collator_for(self.model)(sample)], "preflight", metric_key_prefix="eval")
        self.model.train(was_training)
        if self._metric_key() not in out.metrics:
            raise ValueError(f"metric_for_best_model={self.args.metric_for_best_model!r} is never returned by "
                             f"compute_metrics (it returns {sorted(out.metrics)}); pick one of those")

    # -- hyperparameter search -----------------------------------------------------------------------------------
    def hyperparameter_search(self, hp_space: Callable | None = None, compute_objective: Callable | None = None,
                              n_trials: int = 20, direction: str = "minimize", backend: str = "optuna",
                              hp_name: Callable | None = None, **kwargs):
        """Search hyperparameters with optuna: each trial trains a fresh model from model_init; see search.py."""
        from loom.training.search import run_hyperparameter_search

        return run_hyperparameter_search(self, hp_space, compute_objective, n_trials, direction, backend, hp_name,
                                         **kwargs)


# -- helpers -----------------------------------------------------------------------------------------------------------
def _default_label_names(model: nn.Module) -> list[str]:
    model = unwrap_peft(model)
    names = model_input_names(model) or set()
    if "QuestionAnswering" in type(model).__name__:
        return ["start_positions", "end_positions"]
    return ["labels"] if "labels" in names or not names else []


def _token_level(labels: torch.Tensor) -> bool:
    return labels.dim() >= 2 and not labels.is_floating_point()


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether the model's loss predicts the next token (so it drops the first label of each row)."""
    model = unwrap_peft(model)
    return bool(getattr(model, "can_generate", None) and model.can_generate())


def _loss_items(labels: torch.Tensor, shifted: bool):
    """Items one batch's loss averages over: target tokens (after the causal shift when the model shifts) for
    token-level labels, examples otherwise."""
    if not _token_level(labels):
        return labels.shape[0]
    return (labels[..., 1:] if shifted else labels).ne(-100).sum()


def _loss_of(outputs) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0]
    if loss is None:
        raise ValueError("the model returned no loss; give the batch 'labels' (or a compute_loss_func) so it can "
                         "compute one")
    return loss


@contextlib.contextmanager
def _preserved_rng():
    """Run checks that may draw random numbers (an MLM collator) without moving any generator."""
    saved = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(saved)


class ParallelTrainer(ParallelTrainerMixin, Trainer):
    """The Trainer with tensor / context / FSDP2 data parallelism (loom/distributed/trainer.py); `Trainer(...)`
    returns one when the arguments ask for parallelism."""
