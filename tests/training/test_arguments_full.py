"""TrainingArguments take every field of the reference with the same default; a reference script runs unchanged."""
from __future__ import annotations

import dataclasses

import pytest

from loom.training import Trainer, TrainingArguments
from loom.training.argument_checks import UNSUPPORTED
from tests.training.conftest import PadCollator, lm_rows, tiny_llama

LOOM_ONLY = {"warmup_ratio", "tp_size", "cp_size"}


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def test_every_reference_field_with_its_default():
    import transformers

    ref, ours = _defaults(transformers.TrainingArguments), _defaults(TrainingArguments)
    assert set(ref) - set(ours) == set(), "fields of the reference loom does not take"
    assert set(ours) - set(ref) == LOOM_ONLY
    for name, value in ref.items():
        assert ours[name] == getattr(value, "value", value), name  # the reference's enum members: strings here


def test_constructed_defaults_match_the_reference():
    """After __post_init__ (output_dir default, checkpointing alias, token counting, do_eval...) the values agree."""
    import transformers

    ref = transformers.TrainingArguments(use_cpu=True, eval_strategy="steps", include_num_input_tokens_seen=True,
                                         gradient_checkpointing=True, torch_compile_mode="default", debug="")
    ours = TrainingArguments(use_cpu=True, eval_strategy="steps", include_num_input_tokens_seen=True,
                             gradient_checkpointing=True, torch_compile_mode="default", debug="")
    for name in ("output_dir", "gradient_checkpointing", "activation_checkpointing", "include_num_input_tokens_seen",
                 "torch_compile", "torch_compile_backend", "do_eval", "eval_steps", "dataloader_pin_memory", "debug",
                 "report_to", "metric_for_best_model", "greater_is_better"):
        assert getattr(ours, name) == getattr(getattr(ref, name), "value", getattr(ref, name)), name
    assert TrainingArguments().output_dir == "trainer_output"
    assert TrainingArguments(eval_strategy="steps", eval_steps=0, logging_steps=7).eval_steps == 7


@pytest.mark.parametrize("name, value", [(n, v) for n, v in [
    ("deepspeed", "ds.json"), ("use_liger_kernel", True), ("accelerator_config", {"split_batches": True}),
    ("ddp_find_unused_parameters", False), ("ddp_timeout", 60), ("fsdp_config", {"min_num_params": 1}),
    ("debug", "underflow_overflow"), ("skip_memory_metrics", False), ("enable_jit_checkpoint", True),
    ("average_tokens_across_devices", False), ("optim_target_modules", ["q_proj"])]])
def test_fields_loom_cannot_honour_are_named(name, value):
    assert name in UNSUPPORTED
    with pytest.raises(ValueError, match=f"{name}=.* is not supported: .*Leave {name} at its default"):
        TrainingArguments(**{name: value})


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataloader_prefetch_factor=2), "dataloader_prefetch_factor needs worker processes"),
    (dict(dataloader_persistent_workers=True), "dataloader_persistent_workers=True needs worker processes"),
    (dict(include_num_input_tokens_seen="some"), "include_num_input_tokens_seen='some' is not supported"),
    (dict(train_sampling_strategy="batch_rebalance"), "'batch_rebalance' is not implemented in loom"),
    (dict(train_sampling_strategy="shortest"), "train_sampling_strategy='shortest' is not supported"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau"), "reduce_lr_on_plateau.*set eval_strategy"),
    (dict(lr_scheduler_type="greedy"), "greedy.*set eval_strategy"),
    (dict(torch_empty_cache_steps=0), "torch_empty_cache_steps must be a positive integer"),
    (dict(label_smoothing_factor=1.5), r"label_smoothing_factor must lie in \[0, 1\)"),
    (dict(include_for_metrics=["logits"]), r"include_for_metrics=\['logits'\]"),
    (dict(bf16_full_eval=True, fp16_full_eval=True), "bf16_full_eval=True and fp16_full_eval=True contradict"),
    (dict(tf32=True), "tf32=True needs a CUDA GPU"),
    (dict(gradient_checkpointing_kwargs="{bad json"), "gradient_checkpointing_kwargs is not valid JSON"),
    (dict(hub_strategy="sometimes"), "hub_strategy='sometimes' is not supported"),
    (dict(save_steps=2.5), "save_steps=2.5 must be a whole number of steps"),
])
def test_new_fields_are_checked(kwargs, message):
    if kwargs.get("tf32"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("tf32=True is valid on a CUDA machine")
    with pytest.raises(ValueError, match=message):
        TrainingArguments(**kwargs)


def test_json_strings_become_dicts_and_compile_options_turn_compile_on():
    args = TrainingArguments(gradient_checkpointing_kwargs='{"use_reentrant": true}', torch_compile_backend="eager")
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": True} == args.activation_checkpointing_kwargs
    assert args.torch_compile is True and args.torch_compile_backend == "eager"
    assert TrainingArguments(activation_checkpointing=True).gradient_checkpointing is True
    changed = TrainingArguments().replace(gradient_checkpointing=True)
    assert changed.gradient_checkpointing is True and changed.activation_checkpointing is True


def test_a_reference_script_runs_unchanged(tmp_path):
    """The arguments of a typical fine-tuning script written for the reference, passed as they are."""
    import transformers

    script = dict(
        output_dir=str(tmp_path / "run"), do_train=True, do_eval=True,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6,
        max_grad_norm=1.0, num_train_epochs=2, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.1, logging_strategy="steps", logging_steps=1,
        logging_first_step=True, logging_nan_inf_filter=True, eval_strategy="steps", eval_steps=2, eval_delay=2,
        eval_accumulation_steps=2, save_strategy="steps", save_steps=2, save_total_limit=2, save_only_model=False,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False, seed=1234,
        data_seed=7, bf16=False, fp16=False, tf32=None, dataloader_num_workers=0, dataloader_drop_last=False,
        dataloader_pin_memory=True, remove_unused_columns=True, label_names=["labels"], report_to="none",
        run_name="script", disable_tqdm=True, optim="adamw_torch", optim_args=None, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, label_smoothing_factor=0.05,
        include_num_input_tokens_seen=True, train_sampling_strategy="group_by_length", length_column_name="length",
        push_to_hub=False, hub_model_id=None, hub_strategy="every_save", hub_private_repo=None, log_level="warning",
        ddp_find_unused_parameters=None, torch_compile=False, use_cpu=True, full_determinism=False,
        neftune_noise_alpha=None, auto_find_batch_size=False, prediction_loss_only=False)
    transformers.TrainingArguments(**script)  # a valid reference script
    args = TrainingArguments(**script)
    trainer = Trainer(tiny_llama(), args, train_dataset=lm_rows(24), eval_dataset=lm_rows(8, seed=3),
                      data_collator=PadCollator())
    out = trainer.train()
    assert out.global_step == 6 and trainer.state.best_model_checkpoint is not None
    assert trainer.state.num_input_tokens_seen > 0
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2, 4, 6]
    assert "eval_loss" in trainer.evaluate()


def test_parser_reads_the_new_fields():
    from loom.training import HfArgumentParser

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--include_num_input_tokens_seen", "true", "--include_for_metrics", "inputs", "loss", "--optim_args",
         "momentum=0.9", "--optim", "sgd", "--lr_scheduler_kwargs", '{"num_cycles": 2}', "--neftune_noise_alpha", "5",
         "--train_sampling_strategy", "group_by_length", "--no_logging_nan_inf_filter", "--do_train"])
    assert args.include_num_input_tokens_seen == "all" and args.include_for_metrics == ["inputs", "loss"]
    assert args.optim_args == "momentum=0.9" and args.lr_scheduler_kwargs == {"num_cycles": 2}
    assert args.neftune_noise_alpha == 5.0 and args.logging_nan_inf_filter is False and args.do_train is True


def test_hub_token_is_never_written_out():
    args = TrainingArguments(hub_token="hf_secret")
    assert args.hub_token == "hf_secret" and args.replace(seed=1).hub_token == "hf_secret"
    assert "hf_secret" not in repr(args) and "hf_secret" not in args.to_json_string()
    assert args.to_dict()["hub_token"] == "<HUB_TOKEN>" and TrainingArguments().to_dict()["hub_token"] is None
