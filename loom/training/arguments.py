"""TrainingArguments: every field of the reference (same names and defaults), checked when constructed.

Fields loom cannot honour are refused by argument_checks.check_unsupported when set to a non-default value."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from loom.training import argument_checks as checks
from loom.training.integrations import normalise_report_to


@dataclass
class TrainingArguments:
    """What to train for how long, with which optimizer and schedule, and when to log, evaluate and save.

    Field names and defaults follow the reference. Interval fields (logging_steps, eval_steps, save_steps) below 1
    are ratios of the total number of optimizer steps, as in the reference.
    """

    # the fields that take a dict (or its JSON text), which the reference's argument parser tests list
    _VALID_DICT_FIELDS: ClassVar[list[str]] = ["accelerator_config", "fsdp_config", "deepspeed",
                                               "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs",
                                               "lr_scheduler_kwargs"]

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
    lr_scheduler_type: str = field(default="linear", metadata={"help": "A schedule name (see get_scheduler)."})
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
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Recompute activations in backward."})
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model's forward with torch.compile."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    dataloader_drop_last: bool = field(default=False, metadata={"help": "Drop the last incomplete batch."})
    dataloader_pin_memory: bool = field(default=True, metadata={"help": "Pin host memory when on a GPU."})
    remove_unused_columns: bool = field(default=True, metadata={"help": "Drop inputs the model does not take."})
    label_names: list[str] | None = field(default=None, metadata={"help": "Keys of the labels in a batch."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "none, all, or some of jsonl, "
                                                                                 "tensorboard, wandb, mlflow, trackio"})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "An optimizer name (see create_optimizer)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint to resume from."})
    batch_eval_metrics: bool = field(default=False, metadata={"help": "Call compute_metrics on every eval batch."})
    prediction_loss_only: bool = field(default=False, metadata={"help": "Evaluation returns only the loss."})
    disable_tqdm: bool | None = field(default=None, metadata={"help": "Hide the progress bar."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    run_name: str | None = field(default=None, metadata={"help": "A name for the run in logs."})
    tp_size: int = field(default=1, metadata={"help": "Tensor-parallel size (under torchrun)."})
    cp_size: int = field(default=1, metadata={"help": "Context-parallel size (under torchrun)."})
    fsdp: bool | str | None = field(default=None, metadata={"help": "Shard parameters with FSDP2 ('offload' adds "
                                                                        "CPU offload)."})
    # -- the rest of the reference's fields (same names and defaults); argument_checks.py says which loom refuses ----
    optim_args: str | None = field(default=None, metadata={"help": "Optimizer options as 'k=v,k=v'."})
    optim_target_modules: str | list[str] | None = field(default=None, metadata={"help": "GaLore/APOLLO targets."})
    average_tokens_across_devices: bool = field(default=True, metadata={"help": "Normalise by the global token "
                                                                                "count (loom always does)."})
    label_smoothing_factor: float = field(default=0.0, metadata={"help": "Label smoothing (0: none)."})
    bf16_full_eval: bool = field(default=False, metadata={"help": "Evaluate with the model cast to bfloat16."})
    fp16_full_eval: bool = field(default=False, metadata={"help": "Evaluate with the model cast to float16."})
    tf32: bool | None = field(default=None, metadata={"help": "Allow TF32 matmuls on CUDA (None: leave as is)."})
    activation_checkpointing: bool | None = field(default=None, metadata={"help": "Alias of gradient_checkpointing."})
    activation_checkpointing_kwargs: dict | str | None = field(default=None, metadata={
        "help": "Alias of gradient_checkpointing_kwargs."})
    gradient_checkpointing_kwargs: dict | str | None = field(default=None, metadata={
        "help": "Passed to model.gradient_checkpointing_enable."})
    torch_compile_backend: str | None = field(default=None, metadata={"help": "torch.compile backend (sets "
                                                                              "torch_compile)."})
    torch_compile_mode: str | None = field(default=None, metadata={"help": "torch.compile mode (sets torch_compile)."})
    use_liger_kernel: bool = field(default=False, metadata={"help": "Liger kernels (not in loom)."})
    liger_kernel_config: dict | None = field(default=None, metadata={"help": "Liger kernel options (not in loom)."})
    use_cache: bool = field(default=False, metadata={"help": "model.config.use_cache during training."})
    neftune_noise_alpha: float | None = field(default=None, metadata={"help": "NEFTune noise on input embeddings."})
    torch_empty_cache_steps: int | None = field(default=None, metadata={"help": "Empty the device cache every N "
                                                                                "steps."})
    auto_find_batch_size: bool = field(default=False, metadata={"help": "Halve the batch size on out-of-memory."})
    log_on_each_node: bool = field(default=True, metadata={"help": "Multi-node logging (loom logs on rank 0)."})
    logging_nan_inf_filter: bool = field(default=True, metadata={"help": "Keep nan/inf losses out of the logs."})
    include_num_input_tokens_seen: str | bool = field(default="no", metadata={"help": "no, all or non_padding."})
    log_level: str = field(default="passive", metadata={"help": "Level of loom's logger (passive: leave it)."})
    log_level_replica: str = field(default="warning", metadata={"help": "Level of loom's logger on other ranks."})
    project: str = field(default="huggingface", metadata={"help": "Project name for trackers."})
    trackio_space_id: str | None = field(default=None, metadata={"help": "Trackio Space id."})
    trackio_bucket_id: str | None = field(default=None, metadata={"help": "Trackio bucket id."})
    trackio_static_space_id: str | None = field(default=None, metadata={"help": "Trackio static Space id (or "
                                                                                "False)."})
    eval_delay: float = field(default=0, metadata={"help": "Steps or epochs before the first evaluation."})
    eval_on_start: bool = field(default=False, metadata={"help": "Evaluate once before the first step."})
    eval_do_concat_batches: bool = field(default=True, metadata={"help": "False: predictions as a list per batch."})
    eval_use_gather_object: bool = field(default=False, metadata={"help": "Gather objects across ranks (not in "
                                                                                "loom)."})
    eval_accumulation_steps: int | None = field(default=None, metadata={"help": "Accepted; loom moves outputs "
                                                                                 "to the CPU after every batch."})
    include_for_metrics: list[str] = field(default_factory=list, metadata={"help": "inputs and/or loss for "
                                                                                   "compute_metrics."})
    save_only_model: bool = field(default=False, metadata={"help": "Checkpoints hold only the model (no resume)."})
    save_on_each_node: bool = field(default=False, metadata={"help": "Multi-node saving (not in loom)."})
    enable_jit_checkpoint: bool = field(default=False, metadata={"help": "Checkpoint on SIGTERM (not in loom)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the model to the Hub when saving."})
    hub_token: str | None = field(default=None, repr=False, metadata={"help": "Hub token (never written out)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repository as private."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id."})
    hub_strategy: str = field(default="every_save", metadata={"help": "end, every_save, checkpoint, "
                                                                      "all_checkpoints."})
    hub_always_push: bool = field(default=False, metadata={"help": "Push even while a push is in flight."})
    hub_revision: str | None = field(default=None, metadata={"help": "Hub branch to push to."})
    ignore_data_skip: bool = field(default=False, metadata={"help": "On resume, restart the epoch's data order."})
    restore_callback_states_from_checkpoint: bool = field(default=False, metadata={
        "help": "Accepted; loom always restores callback states (exact resume)."})
    full_determinism: bool = field(default=False, metadata={"help": "Deterministic torch algorithms."})
    accelerator_config: dict | str | None = field(default=None, metadata={"help": "Accelerate options (not in loom)."})
    parallelism_config: Any = field(default=None, metadata={"help": "Accelerate parallelism (use tp_size/cp_size)."})
    dataloader_persistent_workers: bool = field(default=False, metadata={"help": "Keep DataLoader workers alive."})
    dataloader_prefetch_factor: int | None = field(default=None, metadata={"help": "Batches prefetched per worker."})
    dataloader_multiprocessing_context: str | None = field(default=None, metadata={"help": "fork, spawn or "
                                                                                           "forkserver."})
    dataloader_in_order: bool = field(default=True, metadata={"help": "Batches in order (loom always)."})
    train_sampling_strategy: str = field(default="random", metadata={"help": "random, sequential, group_by_length."})
    length_column_name: str = field(default="length", metadata={"help": "Precomputed lengths for group_by_length."})
    ddp_find_unused_parameters: bool | None = field(default=None, metadata={"help": "DDP option (not in loom)."})
    ddp_bucket_cap_mb: int | None = field(default=None, metadata={"help": "DDP option (not in loom)."})
    ddp_broadcast_buffers: bool | None = field(default=None, metadata={"help": "DDP option (not in loom)."})
    ddp_static_graph: bool | None = field(default=None, metadata={"help": "DDP option (not in loom)."})
    ddp_backend: str | None = field(default=None, metadata={"help": "Process-group backend (not in loom)."})
    ddp_timeout: int = field(default=1800, metadata={"help": "Process-group timeout (loom: LOOM_DIST_TIMEOUT)."})
    fsdp_config: dict | str | None = field(default=None, metadata={"help": "FSDP1 options (not in loom)."})
    deepspeed: dict | str | None = field(default=None, metadata={"help": "DeepSpeed config (not in loom)."})
    debug: str | list[str] = field(default="", metadata={"help": "Debug features (not in loom)."})
    skip_memory_metrics: bool = field(default=True, metadata={"help": "loom reports no memory metrics."})
    do_train: bool = field(default=False, metadata={"help": "For scripts; the Trainer does not read it."})
    do_eval: bool = field(default=False, metadata={"help": "For scripts; the Trainer does not read it."})
    do_predict: bool = field(default=False, metadata={"help": "For scripts; the Trainer does not read it."})
    local_rank: int = field(default=-1, metadata={"help": "Set by launchers; loom reads LOCAL_RANK."})

    def __post_init__(self) -> None:
        checks.normalise(self)
        checks.check_choices(self)
        checks.check_sizes(self)
        checks.check_unsupported(self)
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps
        needs_metric = self.load_best_model_at_end or self.save_strategy == "best" or \
            self.lr_scheduler_type in checks.METRIC_SCHEDULERS
        if needs_metric and self.metric_for_best_model is None:
            if self.save_strategy == "best":
                raise ValueError("save_strategy='best' needs metric_for_best_model (the metric that decides "
                                 "which checkpoint is best)")
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        checks.check_best_model(self)
        self.report_to = normalise_report_to(self.report_to)
        if isinstance(self.label_names, str):
            self.label_names = [self.label_names]
        checks.apply_tf32(self.tf32)

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
        """The fields as a dict, with secrets (hub_token) replaced by a placeholder, as the reference writes them."""
        return {f.name: f"<{f.name.upper()}>" if f.name.endswith("_token") and getattr(self, f.name) else
                _json_ready(getattr(self, f.name)) for f in fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"

    def replace(self, **changes: Any) -> "TrainingArguments":
        """A copy with some fields changed, validated again."""
        data = asdict(self)
        for pair in checks.ALIASES:  # changing one name of an alias pair changes both
            given = [name for name in pair if name in changes]
            if len(given) == 1:
                changes = {**changes, **{name: changes[given[0]] for name in pair}}
        data.update(changes)
        return type(self)(**data)


def _json_ready(value: Any) -> Any:
    """A torch.dtype (a field a subclass may add) as its name, "float32", as the reference writes it."""
    kind = type(value)
    return str(value).removeprefix("torch.") if kind.__module__ == "torch" and kind.__name__ == "dtype" else value


def steps_from(value: float | None, total_steps: int) -> int | None:
    """An interval in steps: a float below 1 is a ratio of total_steps (the reference's rule)."""
    if value is None:
        return None
    if checks.is_ratio(value):
        return max(1, int(-(-value * total_steps // 1)))
    return int(value)



