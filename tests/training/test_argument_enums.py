"""The reference's TrainingArguments enums: same members and values as the reference's, equal to the plain strings
loom's TrainingArguments keeps; unknown values name the valid ones; dtype fields serialise by name."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import trainer_utils as ref_utils
from transformers import training_args as ref_args

import loom
from loom.training import enums


@pytest.mark.parametrize("name", ["IntervalStrategy", "SaveStrategy", "HubStrategy", "SchedulerType",
                                  "OptimizerNames"])
def test_members_match_reference(name):
    ref = getattr(ref_utils, name, None) or getattr(ref_args, name)
    ours = getattr(loom, name)
    assert [(m.name, m.value) for m in ours] == [(m.name, m.value) for m in ref]
    assert ours is getattr(enums, name)


def test_arguments_compare_equal_to_members(tmp_path):
    args = loom.TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=10,
                                  save_strategy="epoch", hub_strategy="end", lr_scheduler_type="linear",
                                  optim="adamw_torch", report_to=None)
    assert args.eval_strategy == loom.IntervalStrategy.STEPS
    assert args.save_strategy == loom.SaveStrategy.EPOCH
    assert args.hub_strategy == loom.HubStrategy.END
    assert args.lr_scheduler_type == loom.SchedulerType.LINEAR
    assert args.optim == loom.OptimizerNames.ADAMW_TORCH
    assert str(loom.IntervalStrategy.EPOCH) == "epoch"


def test_unknown_value_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'sometimes' is not a valid IntervalStrategy; choose one of \['no', "):
        loom.IntervalStrategy("sometimes")


def test_dtype_fields_serialise_by_name(tmp_path):
    @dataclasses.dataclass
    class WithDtype(loom.TrainingArguments):
        dtype: torch.dtype = dataclasses.field(default=torch.float32)

    for dtype in (torch.bfloat16, torch.int8, torch.bool):
        args = WithDtype(output_dir=str(tmp_path), dtype=dtype, report_to=None)
        assert args.to_dict()["dtype"] == str(dtype).removeprefix("torch.")
        assert f'"dtype": "{str(dtype)[6:]}"' in args.to_json_string()
