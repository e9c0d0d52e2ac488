"""Every optimizer and schedule name loom takes from the reference: same class, same hyper-parameters, same steps."""
from __future__ import annotations

import pytest
import torch

from loom.training import TrainingArguments, get_scheduler
from loom.training.argument_checks import BNB_OPTIMIZERS, FOREIGN_OPTIMIZERS
from loom.training.optim_options import parse_optim_args
from loom.training.optimization import create_optimizer

TORCH_CASES = [("adamw_torch", None), ("adamw_torch_fused", None), ("sgd", "momentum=0.9, nesterov=True"),
               ("sgd", None), ("adagrad", "lr_decay=0.01,eps=1e-9"), ("rmsprop", "momentum=0.5,alpha=0.9,centered=1"),
]  # adafactor: tests/training/test_adafactor.py (loom has its own class, as the reference)
BNB_CASES = [(name, None) for name in BNB_OPTIMIZERS] + [("ademamix", "beta3=0.999,alpha=4.0,t_alpha=10")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(80, 64), torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))


def _reference_optimizer(model, optim, optim_args):
    import transformers

    args = transformers.TrainingArguments(output_dir="unused", optim=optim, optim_args=optim_args,
                                          learning_rate=1e-3, weight_decay=0.1, use_cpu=True)
    groups = [{"params": [p for n, p in model.named_parameters() if "weight" in n and n != "2.weight"],
               "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if not ("weight" in n and n != "2.weight")],
               "weight_decay": 0.0}]
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls(groups, **kwargs)


def _steps(model, optimizer, n=3):
    g = torch.Generator().manual_seed(5)
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optim, optim_args", TORCH_CASES + BNB_CASES)
def test_optimizer_matches_reference(optim, optim_args):
    ours_model, ref_model = _model(), _model()
    args = TrainingArguments(optim=optim, optim_args=optim_args, learning_rate=1e-3, weight_decay=0.1)
    ours = create_optimizer(ours_model, args)
    ref = _reference_optimizer(ref_model, optim, optim_args)
    assert type(ours) is type(ref)
    drop = {"fused"} if optim != "adamw_torch_fused" else set()  # loom turns fused on only where supported
    assert {k: v for k, v in ours.defaults.items() if k not in drop} == \
        {k: v for k, v in ref.defaults.items() if k not in drop}
    for a, b in zip(_steps(ours_model, ours), _steps(ref_model, ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rmsprop_bnb_reads_optim_args_as_numbers():
    # the reference hands rmsprop_bnb its optim_args as strings, which bitsandbytes cannot compare; loom converts
    model = _model()
    ours = create_optimizer(model, TrainingArguments(optim="rmsprop_bnb_8bit", optim_args="alpha=0.95,eps=1e-7,"
                                                     "centered=false"))
    assert (ours.defaults["betas"][0], ours.defaults["eps"], ours.args.optim_bits) == (0.95, 1e-7, 8)
    before = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, _steps(model, ours, 1)))


def test_eight_bit_optimizers_keep_embeddings_in_32_bit():
    import bitsandbytes as bnb

    model = _model()
    create_optimizer(model, TrainingArguments(optim="adamw_8bit"))
    overrides = bnb.optim.GlobalOptimManager.get_instance().module_weight_config_triple
    assert any(module is model[0] and config == {"optim_bits": 32} for module, _, config in overrides)


def test_optim_args_parsing_and_errors():
    assert parse_optim_args(" momentum = 0.9,nesterov=True") == {"momentum": "0.9", "nesterov": "True"}
    assert parse_optim_args(None) == {}
    with pytest.raises(ValueError, match="'momentum' is not of the form key=value"):
        TrainingArguments(optim="sgd", optim_args="momentum")
    with pytest.raises(ValueError, match=r"optim_args \['betas'\] are not options of optim='sgd'"):
        create_optimizer(_model(), TrainingArguments(optim="sgd", optim_args="betas=0.1"))


def test_optimizers_of_other_packages_are_named():
    assert "galore_adamw" in FOREIGN_OPTIMIZERS
    with pytest.raises(ValueError, match="optim='galore_adamw' needs the galore_torch package"):
        TrainingArguments(optim="galore_adamw")


SCHEDULES = [("cosine_with_min_lr", {"min_lr": 1e-3}), ("cosine_with_min_lr", {"min_lr_rate": 0.2, "num_cycles": 1}),
             ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
             ("cosine_warmup_with_min_lr", {"min_lr": 1e-3, "warmup_lr_rate": 0.2}),
             ("warmup_stable_decay", {"num_decay_steps": 6}),
             ("warmup_stable_decay", {"num_decay_steps": 5, "num_stable_steps": 7, "warmup_type": "cosine",
                                      "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
             ("warmup_stable_decay", {"num_decay_steps": 8, "warmup_type": "1-sqrt", "decay_type": "linear"})]


def _lrs(factory, name, kwargs, metrics=None):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = factory(name, opt, num_warmup_steps=4, num_training_steps=20, scheduler_specific_kwargs=dict(kwargs))
    out = []
    for i in range(len(metrics) if metrics else 24):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metrics[i]) if metrics else sched.step()
    return out


@pytest.mark.parametrize("name, kwargs", SCHEDULES)
def test_new_schedules_match_reference(name, kwargs):
    import transformers

    assert _lrs(get_scheduler, name, kwargs) == pytest.approx(_lrs(transformers.get_scheduler, name, kwargs),
                                                               rel=1e-12, abs=1e-15)


def test_reduce_lr_on_plateau_matches_reference():
    import transformers

    metrics = [1.0, 0.9, 0.95, 0.97, 0.99, 0.91, 0.92, 0.93, 0.94] + [1.0] * 15
    kwargs = {"patience": 1, "factor": 0.5}
    ours = _lrs(get_scheduler, "reduce_lr_on_plateau", kwargs, metrics)
    assert ours == _lrs(transformers.get_scheduler, "reduce_lr_on_plateau", kwargs, metrics)
    assert min(ours) < 0.1  # the plateau did lower the rate


@pytest.mark.parametrize("name, kwargs, message", [
    ("cosine_with_min_lr", {}, "needs exactly one of min_lr or min_lr_rate"),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-3, "min_lr_rate": 0.1}, "got both"),
    ("warmup_stable_decay", {}, "needs num_decay_steps"),
    ("warmup_stable_decay", {"num_decay_steps": 2, "decay_type": "cubic"}, "decay_type='cubic' is not one of"),
])
def test_schedule_arguments_are_checked(name, kwargs, message):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        get_scheduler(name, opt, num_warmup_steps=2, num_training_steps=10, scheduler_specific_kwargs=kwargs)


@pytest.mark.parametrize("kwargs", [
    {"patience": 1, "factor": 0.5, "min_lr": 0.01, "max_lr": 0.3},
    {"patience": 0, "factor": 0.8, "cooldown": 2, "warmup": 1, "threshold_mode": "rel", "threshold": 0.01},
    {"patience": 1, "mode": "max", "smooth": True, "window_size": 3, "min_lr": 0.05},
    {"patience": 0, "factor": 0.5, "min_lr": 0.02, "reset_start": 2},
])
def test_greedy_schedule_matches_reference(kwargs):
    import transformers

    g = torch.Generator().manual_seed(0)
    # falling, then flat, then noisy metrics: raises, cuts, cooldowns and (with reset_start) restarts all happen
    metrics = [1.0 - 0.05 * i for i in range(8)] + [0.6] * 10 + (torch.rand(20, generator=g) + 0.5).tolist()
    ours = _lrs(get_scheduler, "greedy", kwargs, metrics)
    assert ours == _lrs(transformers.get_scheduler, "greedy", kwargs, metrics)
    assert len(set(ours)) > 2  # the rate moved both ways or several times
