"""Schedules match the reference's at every step; weight decay skips biases and norm weights as the reference does."""
from __future__ import annotations

import pytest
import torch

from loom.training import get_scheduler
from loom.training.optimization import decay_parameter_names

SCHEDULES = [("linear", {}), ("cosine", {}), ("cosine_with_restarts", {"num_cycles": 3}),
             ("polynomial", {"power": 2.0, "lr_end": 1e-4}), ("constant", {}), ("constant_with_warmup", {}),
             ("inverse_sqrt", {})]


@pytest.mark.parametrize("name, kwargs", SCHEDULES)
def test_schedule_matches_reference(name, kwargs):
    import transformers

    def lrs(factory):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = factory(name, opt, num_warmup_steps=4, num_training_steps=20, scheduler_specific_kwargs=kwargs)
        out = []
        for _ in range(24):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert lrs(get_scheduler) == pytest.approx(lrs(transformers.get_scheduler), rel=1e-12, abs=1e-15)


def test_unknown_schedule_is_an_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="lr_scheduler_type='zigzag' is not supported"):
        get_scheduler("zigzag", opt, 0, 10)


def test_decay_groups_match_reference():
    import transformers

    from tests.loomtest import TINY
    from tests.training.conftest import tiny_bert, tiny_llama

    ref_bert = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY["bert"]))
    ref_llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY["llama"]))
    for ours, ref in ((tiny_bert(), ref_bert), (tiny_llama(), ref_llama)):
        expected = set(transformers.Trainer.get_decay_parameter_names(None, ref))
        assert decay_parameter_names(ours) == expected
        assert not any("bias" in n or "norm" in n.lower() for n in expected)


NAMED_SCHEDULES = {
    "get_constant_schedule": {}, "get_constant_schedule_with_warmup": {"num_warmup_steps": 3},
    "get_linear_schedule_with_warmup": {"num_warmup_steps": 3, "num_training_steps": 12},
    "get_cosine_schedule_with_warmup": {"num_warmup_steps": 2, "num_training_steps": 12, "num_cycles": 0.7},
    "get_cosine_with_hard_restarts_schedule_with_warmup": {"num_warmup_steps": 2, "num_training_steps": 12,
                                                           "num_cycles": 3},
    "get_polynomial_decay_schedule_with_warmup": {"num_warmup_steps": 2, "num_training_steps": 12, "lr_end": 1e-4,
                                                  "power": 2.0},
    "get_inverse_sqrt_schedule": {"num_warmup_steps": 3, "timescale": 5},
}


@pytest.mark.parametrize("name", sorted(NAMED_SCHEDULES))
def test_named_schedule_functions_match_the_reference(name):
    """The reference's get_*_schedule functions, importable from loom, give its learning rates step by step."""
    import transformers

    import loom

    def rates(fn):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = fn(opt, **NAMED_SCHEDULES[name])
        out = []
        for _ in range(14):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert rates(getattr(loom, name)) == pytest.approx(rates(getattr(transformers, name)), rel=1e-12, abs=1e-15)
