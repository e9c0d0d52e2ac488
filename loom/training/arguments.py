"""TrainingArguments: the reference's common fields, checked for contradictions when constructed."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from loom.training.integrations import normalise_report_to

STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = (*STRATEGIES, "best")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw", "sgd", "adafactor")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


@dataclass
class TrainingArguments:
    """What to train for how long, with which optimizer and schedule, and when to log, evaluate and save.

    Field names and defaults follow the reference. Interval fields (logging_steps, eval_steps, save_steps) below 1
    are ratios of the total number of optimizer steps, as in the reference.
    """

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints and logs are written."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs to train (fractions allowed)."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0: total optimizer steps, overriding epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training micro-batch size."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (not on biases/norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 or less: no clipping)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": f"One of {', '.join(SCHEDULERS)}."})
    lr_scheduler_kwargs: dict | None = field(default=None, metadata={"help": "Extra scheduler arguments."})
    warmup_steps: float = field(default=0, metadata={"help": "Warmup steps (a float < 1 is a ratio)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of total steps."})
    logging_strategy: str = field(default="steps", metadata={"help": "When to log: no, steps, epoch."})
    logging_steps: float = field(default=500, metadata={"help": "Log every N optimizer steps."})
    logging_first_step: bool = field(default=False, metadata={"help": "Also log after the first step."})
    eval_strategy: str = field(default="no", metadata={"help": "When to evaluate: no, steps, epoch."})
    eval_steps: float | None = field(default=None, metadata={"help": "Evaluate every N steps (default logging_steps)."})
    save_strategy: str = field(default="steps", metadata={"help": "When to save: no, steps, epoch, best."})
    save_steps: float = field(default=500, metadata={"help": "Save a checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints (best kept)."})
    load_best_model_at_end: bool = field(default=False, metadata={"help": "Reload the best checkpoint at the end."})
    metric_for_best_model: str | None = field(default=None, metadata={"help": "Metric that picks the best model."})
    greater_is_better: bool | None = field(default=None, metadata={"help": "Whether a larger metric is better."})
    seed: int = field(default=42, metadata={"help": "Seed set at the start of training."})
    data_seed: int | None = field(default=None, metadata={"help": "Seed of the data order (default: seed)."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast for forward passes."})
    fp16: bool = field(default=False, metadata={"help": "float16 autocast with a gradient scaler."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model's forward with torch.compile."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    dataloader_drop_last: bool = field(default=False, metadata={"help": "Drop the last incomplete batch."})
    dataloader_pin_memory: bool = field(default=True, metadata={"help": "Pin host memory when on a GPU."})
    remove_unused_columns: bool = field(default=True, metadata={"help": "Drop inputs the model does not take."})
    label_names: list[str] | None = field(default=None, metadata={"help": "Keys of the labels in a batch."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "none, all, or some of jsonl, "
                                                                                 "tensorboard, wandb, mlflow, trackio"})
    optim: str = field(default="adamw_torch_fused", metadata={"help": f"One of {', '.join(OPTIMIZERS)}."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint to resume from."})
    batch_eval_metrics: bool = field(default=False, metadata={"help": "Call compute_metrics on every eval batch."})
    prediction_loss_only: bool = field(default=False, metadata={"help": "Evaluation returns only the loss."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    run_name: str | None = field(default=None, metadata={"help": "A name for the run in logs."})
    tp_size: int = field(default=1, metadata={"help": "Tensor-parallel size (under torchrun)."})
    cp_size: int = field(default=1, metadata={"help": "Context-parallel size (under torchrun)."})
    fsdp: bool | str = field(default=False, metadata={"help": "Shard parameters with FSDP2 ('offload' adds CPU "
                                                                 "offload)."})

    def __post_init__(self) -> None:
        for name in ("lr_scheduler_type", "optim", "logging_strategy", "eval_strategy", "save_strategy"):
            value = getattr(self, name)
            if isinstance(value, Enum):
                setattr(self, name, value.value)
        self._check_choices()
        self._check_sizes()
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if self.load_best_model_at_end or self.save_strategy == "best":
            if self.metric_for_best_model is None:
                if self.save_strategy == "best":
                    raise ValueError("save_strategy='best' needs metric_for_best_model (the metric that decides "
                                     "which checkpoint is best)")
                self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = self.metric_for_best_model.removeprefix("eval_") != "loss"
        self._check_best_model()
        self.report_to = normalise_report_to(self.report_to)
        if isinstance(self.label_names, str):
            self.label_names = [self.label_names]

    def _check_choices(self) -> None:
        for name, allowed in (("lr_scheduler_type", SCHEDULERS), ("optim", OPTIMIZERS),
                              ("logging_strategy", STRATEGIES), ("eval_strategy", STRATEGIES),
                              ("save_strategy", SAVE_STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one of {', '.join(allowed)}")

    def _check_sizes(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(f"nothing to train: max_steps={self.max_steps} and num_train_epochs="
                             f"{self.num_train_epochs}; set one of them to a positive value")
        if self.bf16 and self.fp16:
            raise ValueError("bf16=True and fp16=True contradict each other; choose one mixed-precision mode")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1], got {self.warmup_ratio}")
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio} contradict each "
                             "other; set only one")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")
        for name in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def _check_best_model(self) -> None:
        if not self.load_best_model_at_end:
            return
        if self.eval_strategy == "no":
            raise ValueError("load_best_model_at_end=True needs evaluations to pick the best model; set eval_strategy "
                             "to 'steps' or 'epoch'")
        if self.save_strategy == "best":
            return
        if self.save_strategy != self.eval_strategy:
            raise ValueError(f"load_best_model_at_end=True needs save_strategy to match eval_strategy (got "
                             f"save_strategy={self.save_strategy!r}, eval_strategy={self.eval_strategy!r}) so every "
                             "evaluated model is also saved")
        if self.eval_strategy == "steps" and _is_ratio(self.eval_steps) == _is_ratio(self.save_steps) and \
                round(self.save_steps / self.eval_steps, 8) % 1 != 0:
            raise ValueError(f"load_best_model_at_end=True needs save_steps ({self.save_steps}) to be a multiple of "
                             f"eval_steps ({self.eval_steps})")

    # -- derived values ------------------------------------------------------------------------------------------
    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    @property
    def device(self):
        import torch

        if not self.use_cpu and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def world_size(self) -> int:
        import os

        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
            int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def process_index(self) -> int:
        import os

        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))

    @property
    def wants_parallel(self) -> bool:
        """True when this run needs loom.distributed: under torchrun, or with tp/cp/fsdp asked for."""
        return self.world_size > 1 or self.tp_size > 1 or self.cp_size > 1 or bool(self.fsdp)

    @property
    def should_save(self) -> bool:
        return self.process_index == 0

    def warmup_steps_for(self, num_training_steps: int) -> int:
        """Warmup steps for a run of num_training_steps (ratio forms resolved)."""
        if self.warmup_ratio > 0:
            return int(-(-self.warmup_ratio * num_training_steps // 1))
        if 0 < self.warmup_steps < 1:
            return int(-(-self.warmup_steps * num_training_steps // 1))
        return int(self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"

    def replace(self, **changes: Any) -> "TrainingArguments":
        """A copy with some fields changed, validated again."""
        data = asdict(self)
        data.update(changes)
        return type(self)(**data)


def steps_from(value: float | None, total_steps: int) -> int | None:
    """An interval in steps: a float below 1 is a ratio of total_steps (the reference's rule)."""
    if value is None:
        return None
    if _is_ratio(value):
        return max(1, int(-(-value * total_steps // 1)))
    return int(value)


def _is_ratio(value) -> bool:
    return value is not None and 0 < value < 1

