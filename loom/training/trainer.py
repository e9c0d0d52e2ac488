"""Trainer: the training loop, evaluation and prediction, checkpoints that resume exactly.

One optimizer step consumes a window of `gradient_accumulation_steps` micro-batches (the last window of an epoch may
be shorter). The window's batches are fetched first, the number of loss items (target tokens or examples) is counted
over the whole window, and each micro-batch's loss is divided by that count, so the accumulated gradient equals the
gradient of one big batch.

One Trainer runs in one process and under torchrun: it holds a ParallelContext (loom/distributed/context.py; every
size 1 and every method a no-op in one process) for the sampler, item counting, gradient sync, clipping and model
wrapping, and a checkpoint strategy (loom/distributed/trainer.py: plain files, or DCP shards under parallelism), so
each feature is written once and works in both.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from loom.adapters import unwrap_peft
from loom.distributed.context import ParallelContext, setup_parallel
from loom.distributed.mesh import ParallelDims
from loom.distributed.trainer import checkpoint_strategy
from loom.training import checkpoints as ckpt
from loom.training import trainer_features as features
from loom.training.arguments import TrainingArguments, steps_from
from loom.training.callbacks import (CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback,
                                     TrainerControl, TrainerState)
from loom.training.collators import DataCollatorWithPadding, default_data_collator
from loom.training.data import (LABEL_ALIASES, EpochSampler, LengthGroupedEpochSampler, RemoveColumnsCollator,
                                as_dataset, check_batch, is_hf_dataset, lengths_of, model_input_names, move_to,
                                prepare_hf_dataset)
from loom.training.integrations import reporting_callbacks
from loom.training.optimization import create_optimizer, get_scheduler, steps_on_metrics
from loom.training.seed import enable_full_determinism, set_seed
from loom.training.trainer_checkpoints import CheckpointMixin
from loom.training.trainer_eval import EvaluationMixin
from loom.training.trainer_hub import HubMixin


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]


DEFAULT_CALLBACKS = [DefaultFlowCallback]  # installed first in every Trainer, then the progress bar or printer
TRAINER_STATE_NAME = "trainer_state.json"

class Trainer(HubMixin, EvaluationMixin, CheckpointMixin):
    """Train, evaluate and predict with a model; the reference's constructor arguments and methods.

    Under torchrun, or with tp_size/cp_size/fsdp set in the arguments, the same Trainer shards the model over the
    device mesh (`parallel=` takes a ParallelContext built by `loom.distributed.setup_parallel`), so one script runs
    with `python` and with `torchrun`.
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None,
                 data_collator: Callable | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init: Callable | None = None, compute_loss_func: Callable | None = None,
                 compute_metrics: Callable | None = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), preprocess_logits_for_metrics: Callable | None = None,
                 parallel: ParallelContext | None = None) -> None:
        self.args = args if args is not None else TrainingArguments()
        if model is None and model_init is None:
            raise ValueError("Trainer needs a model (or a model_init function that builds one)")
        self.model_init = model_init
        if model is None:
            set_seed(self.args.seed)
            model = self._call_model_init()
        self.model = model.to(self.args.device)
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = self.args.use_cache  # as the reference: no KV cache while training
        level = self.args.log_level if self.args.process_index == 0 else self.args.log_level_replica
        if level != "passive":
            logging.getLogger("loom").setLevel(level.upper())
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
        self._shifts_labels = self._accepts_num_items or features.is_causal_lm(self.model)
        self.scaler = torch.amp.GradScaler(self.args.device.type) if self.args.fp16 else None
        self.state = self._new_state()
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler(self._default_callbacks() + list(callbacks or []), self.model,
                                                processing_class, self.optimizer, self.lr_scheduler)
        self.hp_search_backend = None
        self.parallel = parallel if parallel is not None else setup_parallel(self.args) \
            if self.args.wants_parallel else ParallelContext(dims=ParallelDims())
        self.checkpoints = checkpoint_strategy(self.parallel)
        if self.parallel.enabled:
            self._parallelise()
        self._forward_model: nn.Module = self.model
        self._init_hub()
        self.control = self.callback_handler.call("on_init_end", self.args, self.state, self.control)

    def _parallelise(self) -> None:
        if self.model_init is not None:
            raise ValueError("a Trainer under torchrun (or with tp_size/cp_size/fsdp) does not support model_init "
                             "(hyper-parameter search); pass a model")
        if self.optimizer is not None:
            raise ValueError("a Trainer under torchrun (or with tp_size/cp_size/fsdp) builds its optimizer after "
                             "sharding the model; pass optimizers=(None, scheduler) or override create_optimizer")
        # before the optimizer exists: FSDP and tensor parallel replace the parameters
        self.model = self.callback_handler.model = self.parallel.wrap_model(self.model)

    def _new_state(self, **fields) -> TrainerState:
        """A TrainerState that knows whether this process is the first of its machine and of the run (printing and
        file-writing callbacks act only there, as in the reference)."""
        import os

        local = int(os.environ.get("LOCAL_RANK", "0")) if self.args.world_size > 1 else 0
        return TrainerState(**fields, is_local_process_zero=local == 0,
                            is_world_process_zero=self.args.process_index == 0)

    def _default_callbacks(self) -> list:
        cbs: list = [DefaultFlowCallback(), PrinterCallback() if self.args.disable_tqdm else ProgressCallback()]
        return cbs + reporting_callbacks(self.args.report_to)

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
        """(world size, data-parallel ranks: those that draw different samples)."""
        return self.parallel.world_size, self.parallel.dp_size

    def _train_sampler(self, dataset):
        """The training order (train_sampling_strategy); under parallelism each data-parallel rank draws its own
        share of it."""
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        if self.parallel.enabled:
            if args.train_sampling_strategy != "random":
                raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} is not supported under "
                                 "torchrun or with tp_size / cp_size / fsdp; use 'random'")
            return self.parallel.sampler(dataset, shuffle=True, seed=seed, drop_last=args.dataloader_drop_last)
        if args.train_sampling_strategy == "group_by_length":
            name = getattr(self.processing_class, "model_input_names", ["input_ids"])[0]
            return LengthGroupedEpochSampler(lengths_of(dataset, name, args.length_column_name),
                                             args.train_batch_size * args.gradient_accumulation_steps, seed)
        return EpochSampler(len(dataset), seed, shuffle=args.train_sampling_strategy == "random")

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        if self._iterable_training():
            return self._loader(self.train_dataset, self.args.train_batch_size, None, self.args.dataloader_drop_last)
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

    def _iterable_training(self) -> bool:
        return isinstance(self.train_dataset, torch.utils.data.IterableDataset)

    def _loader(self, dataset, batch_size: int, sampler, drop_last: bool) -> DataLoader:
        args = self.args
        generator = torch.Generator()  # keeps DataLoader from drawing its worker seed off the global RNG
        generator.manual_seed(args.seed)
        workers = {"persistent_workers": args.dataloader_persistent_workers,
                   "prefetch_factor": args.dataloader_prefetch_factor,
                   "multiprocessing_context": args.dataloader_multiprocessing_context} \
            if args.dataloader_num_workers > 0 else {}
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self._collator_for(self.model),
                          num_workers=args.dataloader_num_workers, drop_last=drop_last, generator=generator,
                          # pinning on the main thread (no workers) costs more per step than it saves
                          pin_memory=args.dataloader_pin_memory and args.device.type == "cuda"
                          and args.dataloader_num_workers > 0, **workers)

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
        causal shift when the model shifts), examples for sequence-level labels, None without labels; summed over
        the data-parallel ranks under parallelism."""
        labels = [b.get("labels") for b in batches]
        if any(lab is None for lab in labels):
            return None
        local = sum(_loss_items(lab, self._shifts_labels) for lab in labels)
        return self.parallel._sum(local, "dp") if self.parallel.enabled else local

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The micro-batch loss, already divided by the item count of the whole accumulated batch when given."""
        if self.parallel.cp_size > 1 and model.training:  # each rank holds its chunks of every sequence
            loss = self.parallel.compute_loss(model, self.parallel.prepare_batch(inputs), num_items_in_batch)
            return (loss, None) if return_outputs else loss
        labels = inputs.get("labels")
        if self.compute_loss_func is not None:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif self.args.label_smoothing_factor and labels is not None and not labels.is_floating_point():
            extra = {"num_items_in_batch": num_items_in_batch} if self._accepts_num_items else {}
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, **extra)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            loss = features.label_smoothed_loss(logits, labels, self.args.label_smoothing_factor,
                                                features.is_causal_lm(model), num_items_in_batch)
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
        # logged losses are global means, equal on every rank
        return self.parallel.reduce_loss(loss) if self.parallel.enabled else loss.detach()

    def autocast(self):
        if self.args.bf16 or self.args.fp16:
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16
            return torch.autocast(self.args.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def gradient_sync(self, is_last_micro_batch: bool):
        """Context for one micro-batch's backward: FSDP reduces gradients only on the last micro-batch of a
        window."""
        return self.parallel.gradient_sync(self.model, is_last_micro_batch)

    def clip_gradients(self) -> torch.Tensor | None:
        """Sync replicated gradients, clip to args.max_grad_norm; returns the total gradient norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else math.inf
        if self.parallel.enabled:
            self.parallel.sync_gradients(self.model)
            return self.parallel.clip_grad_norm_(self.model, max_norm)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return None
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
        if self.model_init is not None and trial is not None:
            set_seed(args.seed)
            self.model = self._call_model_init(trial).to(args.device)
            self.optimizer = self.lr_scheduler = None
            self.callback_handler.model = self.model
        if args.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        neftune = features.add_neftune(self.model, args.neftune_noise_alpha) \
            if args.neftune_noise_alpha is not None else None
        try:
            if not args.auto_find_batch_size:
                return self._train_once(resume, trial)
            return features.train_finding_batch_size(self, resume, trial)
        finally:
            if neftune is not None:
                neftune.remove()

    def _train_once(self, resume: Path | None, trial) -> TrainOutput:
        args = self.args
        if resume is None:
            (enable_full_determinism if args.full_determinism else set_seed)(args.seed)
        loader = self.get_train_dataloader()
        ga = args.gradient_accumulation_steps
        if self._iterable_training():
            if self._parallel_sizes()[1] > 1:
                raise ValueError("an IterableDataset is not sharded over data-parallel ranks, so each would train on "
                                 "the same examples; use a map-style dataset (with __len__) for data parallelism")
            if args.max_steps <= 0:
                raise ValueError("training on an IterableDataset (no length, so no epochs to count) needs max_steps > "
                                 "0 in the TrainingArguments")
            num_batches, num_examples, data_seed = args.max_steps * ga, None, args.seed
        else:
            num_batches, num_examples, data_seed = len(loader), len(self.train_dataset), loader.sampler.seed
        if num_batches == 0:
            raise ValueError(f"the training dataset yields no batches ({num_examples} examples, batch size "
                             f"{args.train_batch_size}, drop_last={args.dataloader_drop_last})")
        steps_per_epoch = math.ceil(num_batches / ga)
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        self._preflight(loader.dataset)
        self.create_optimizer_and_scheduler(max_steps)
        self.state = self._new_state(
            max_steps=max_steps, train_batch_size=args.train_batch_size,
            num_train_epochs=math.ceil(max_steps / steps_per_epoch),
            logging_steps=steps_from(args.logging_steps, max_steps),
            eval_steps=steps_from(args.eval_steps, max_steps) or steps_from(args.logging_steps, max_steps),
            save_steps=steps_from(args.save_steps, max_steps), is_hyper_param_search=trial is not None)
        self.control = TrainerControl()  # a stop requested in an earlier train() does not carry over
        world, dp = self._parallel_sizes()
        self._data_shape = {"num_examples": num_examples, "num_batches": num_batches,
                            # an iterable dataset has no epochs: a resumed run may train to another max_steps
                            "steps_per_epoch": None if num_examples is None else steps_per_epoch,
                            "train_batch_size": args.train_batch_size,
                            "gradient_accumulation_steps": ga, "world_size": world, "data_parallel_size": dp,
                            "global_batch_size": args.train_batch_size * ga * dp, "data_seed": data_seed,
                            "dataloader_drop_last": args.dataloader_drop_last}
        self._pending_loss = torch.zeros((), device=args.device)
        self._pending_steps = 0
        rng = None
        if resume is not None:
            rng = self._load_checkpoint(resume)
        self._forward_model = self.wrap_model(self.model)
        return self._inner_loop(loader, steps_per_epoch, rng)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: compiled when asked."""
        if not self.args.torch_compile:
            return model
        return torch.compile(model, backend=self.args.torch_compile_backend or "inductor",
                             mode=self.args.torch_compile_mode)

    def _inner_loop(self, loader: DataLoader, steps_per_epoch: int, rng: dict | None) -> TrainOutput:
        args, state = self.args, self.state
        ga = args.gradient_accumulation_steps
        num_batches = self._data_shape["num_batches"]
        self.callback_handler.train_dataloader = loader
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        self._last_log_time, self._last_log_step = start, state.global_step
        first_step, self._first_tokens = state.global_step, state.num_input_tokens_seen
        total_loss = 0.0
        # a resumed run trains to the max_steps / num_train_epochs passed now (as the reference): a stop that ended
        # the checkpoint's run does not end this one
        self.control.should_training_stop = False
        self._event("on_train_begin")
        if args.eval_on_start:
            self._evaluate_all(step_scheduler=False)  # the reference's sanity check: no scheduler step
        for epoch in self._epochs_to_train(steps_per_epoch):
            done_in_epoch = state.global_step - epoch * steps_per_epoch
            if done_in_epoch == 0:
                self.control.should_epoch_stop = False
            skip = 0 if args.ignore_data_skip else done_in_epoch * ga
            if self._iterable_training():
                batches = features.endless_batches(loader, skip)
            else:
                loader.sampler.set_epoch(epoch, skip=skip * args.train_batch_size)
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
                if args.torch_empty_cache_steps and state.global_step % args.torch_empty_cache_steps == 0:
                    features.empty_device_cache(args.device)
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
            self._count_input_tokens(batch)
            with self.gradient_sync(i == len(window) - 1):
                step_loss = self.training_step(self._forward_model, batch, num_items, len(window))
            if self.args.logging_nan_inf_filter and not torch.isfinite(step_loss):
                # a nan/inf loss is logged as the mean of the losses since the last log (the reference's filter)
                step_loss = (self._pending_loss + loss) / (1 + self._pending_steps)
            loss += step_loss
            if i < len(window) - 1:
                self._event("on_substep_end")
        self._grad_norm = self.clip_gradients()
        self._event("on_pre_optimizer_step")
        self.optimizer_step()
        self._event("on_optimizer_step")
        if not steps_on_metrics(self.lr_scheduler):
            self.lr_scheduler.step()  # plateau / greedy schedules step on evaluation metrics (_evaluate_all)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _count_input_tokens(self, batch: dict) -> None:
        mode = self.args.include_num_input_tokens_seen
        if mode != "no":
            self.state.num_input_tokens_seen += features.count_input_tokens(
                batch, mode, getattr(self.model, "main_input_name", "input_ids"),
                getattr(self.processing_class, "pad_token_id", None))

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

    def _evaluate_all(self, step_scheduler: bool = True) -> dict[str, float]:
        if isinstance(self.eval_dataset, dict):
            metrics = {}
            for name, dataset in self.eval_dataset.items():
                metrics.update(self.evaluate(dataset, metric_key_prefix=f"eval_{name}"))
        else:
            metrics = self.evaluate()
        self._update_best(metrics)
        if step_scheduler and steps_on_metrics(self.lr_scheduler):
            self.lr_scheduler.step(metrics[self._metric_key()])
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
        if self.args.include_num_input_tokens_seen != "no":
            tokens = self.state.num_input_tokens_seen - self._first_tokens
            metrics["train_tokens_per_second"] = tokens / runtime if runtime else 0.0
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_model_weights(Path(self.state.best_model_checkpoint))
        self._keep_only_best_checkpoint()
        self.log(metrics)
        self._event("on_train_end")
        self._finish_current_push()  # background uploads of checkpoints (trainer_hub.py); raises their errors
        self.model.eval()
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def log(self, logs: dict[str, float]) -> None:
        """Record logs in state.log_history (with epoch and step) and hand them to the callbacks."""
        if self.state.epoch is not None:
            logs = {**logs, "epoch": self.state.epoch}
        if self.args.include_num_input_tokens_seen != "no":
            logs = {**logs, "num_input_tokens_seen": self.state.num_input_tokens_seen}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._event("on_log", logs=logs)

    # -- checks before the first step ----------------------------------------------------------------------------
    def _preflight(self, dataset) -> None:
        """Collate the first batch (RNG untouched) and check it, and compute_metrics' keys, before training."""
        with _preserved_rng():
            if isinstance(dataset, torch.utils.data.IterableDataset):
                first = list(itertools.islice(iter(dataset), self.args.train_batch_size))
                if not first:
                    raise ValueError("the training IterableDataset yields no examples; check that it is not empty")
            else:
                first = [dataset[i] for i in range(min(len(dataset), self.args.train_batch_size))]
            batch = self._collator_for(self.model)(first)
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

