"""TrainingArguments validation and HfArgumentParser over flags, JSON and YAML."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from loom.training import HfArgumentParser, TrainingArguments


@pytest.mark.parametrize("kwargs, message", [
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be a positive integer"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be a positive integer"),
    (dict(bf16=True, fp16=True), "contradict"),
    (dict(warmup_steps=10, warmup_ratio=0.1), "warmup_steps=10 and warmup_ratio=0.1 contradict"),
    (dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps"), "match eval_strategy"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", eval_steps=3, save_steps=10),
     "multiple of eval_steps"),
    (dict(load_best_model_at_end=True), "needs evaluations"),
    (dict(save_strategy="best"), "needs metric_for_best_model"),
    (dict(lr_scheduler_type="wobbly"), "lr_scheduler_type='wobbly' is not supported"),
    (dict(optim="lion"), "optim='lion' is not supported"),
    (dict(max_steps=-1, num_train_epochs=0), "nothing to train"),
    (dict(report_to="comet_ml"), r"report_to=\['comet_ml'\] is not supported"),
])
def test_contradictions_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(output_dir="x", **kwargs)


def test_best_model_defaults():
    args = TrainingArguments(output_dir="x", load_best_model_at_end=True, eval_strategy="steps", eval_steps=5,
                             save_steps=10)
    assert args.metric_for_best_model == "loss" and args.greater_is_better is False
    args = TrainingArguments(output_dir="x", metric_for_best_model="accuracy")
    assert args.greater_is_better is True
    assert TrainingArguments(output_dir="x", eval_strategy="steps", logging_steps=7).eval_steps == 7


def test_warmup_resolution():
    assert TrainingArguments(output_dir="x", warmup_ratio=0.1).warmup_steps_for(95) == 10
    assert TrainingArguments(output_dir="x", warmup_steps=0.5).warmup_steps_for(9) == 5
    assert TrainingArguments(output_dir="x", warmup_steps=3).warmup_steps_for(100) == 3


@dataclass
class ModelArgs:
    model_name: str = field(metadata={"help": "which model"})
    layers: list[int] = field(default_factory=lambda: [1])
    use_fast: bool = True
    dropout: float | None = None


def test_parser_reads_flags():
    parser = HfArgumentParser((ModelArgs, TrainingArguments))
    model_args, train_args = parser.parse_args_into_dataclasses(
        ["--model_name", "m", "--layers", "2", "3", "--no_use_fast", "--output_dir", "o", "--learning-rate", "0.1",
         "--bf16", "--num_train_epochs", "2", "--dropout", "0.5", "--report_to", "jsonl", "--fp16", "false"])
    assert model_args == ModelArgs(model_name="m", layers=[2, 3], use_fast=False, dropout=0.5)
    assert train_args.learning_rate == 0.1 and train_args.bf16 is True and train_args.fp16 is False
    assert train_args.num_train_epochs == 2.0 and train_args.report_to == ["jsonl"]


def test_parser_errors_name_the_problem():
    parser = HfArgumentParser(ModelArgs)
    with pytest.raises(ValueError, match=r"unknown command-line arguments \['--bogus'"):
        parser.parse_args_into_dataclasses(["--model_name", "m", "--bogus", "1"])
    _, rest = parser.parse_args_into_dataclasses(["--model_name", "m", "--bogus", "1"], return_remaining_strings=True)
    assert rest == ["--bogus", "1"]
    with pytest.raises(ValueError, match=r"keys \['extra'\] are not fields"):
        parser.parse_dict({"model_name": "m", "extra": 1})


def test_parser_reads_json_and_yaml(tmp_path):
    parser = HfArgumentParser((ModelArgs, TrainingArguments))
    config = {"model_name": "m", "output_dir": "o", "gradient_accumulation_steps": 4, "use_fast": False}
    (tmp_path / "a.json").write_text(json.dumps(config))
    (tmp_path / "a.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    for name in ("a.json", "a.yaml"):
        model_args, train_args = parser.parse_args_into_dataclasses([str(tmp_path / name)])
        assert model_args.use_fast is False and train_args.gradient_accumulation_steps == 4
    with pytest.raises(ValueError, match="per_device_train_batch_size must be a positive integer"):
        parser.parse_dict({"model_name": "m", "per_device_train_batch_size": 0})
