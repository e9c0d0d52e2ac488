"""Adafactor, AdafactorSchedule and get_wsd_schedule against the reference's: same parameters and optimizer state after
every step (each option set), the Trainer's optim="adafactor", the learning rates a schedule gives, and the errors."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.training import TrainingArguments
from loom.training.optimization import create_optimizer

OPTIONS = [dict(lr=1e-2, relative_step=False, scale_parameter=False),
           dict(),  # relative step, scaled by each parameter's RMS
           dict(warmup_init=True, beta1=0.9, weight_decay=0.1),
           dict(lr=3e-3, relative_step=False, clip_threshold=0.5, decay_rate=-0.5, eps=(1e-20, 1e-2))]


def _params():
    g = torch.Generator().manual_seed(0)
    # a matrix and a 3-D tensor (factored second moments) and a vector (a full one)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((6, 5), (2, 3, 4), (7,))]


def _run(cls, options, steps=4, scheduler=None):
    params = _params()
    opt = cls(params, **options)
    schedule = scheduler(opt) if scheduler else None
    g, rates = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        if schedule is not None:
            rates.extend(float(rate) for rate in schedule.get_lr())
    return params, opt, rates


@pytest.mark.parametrize("options", OPTIONS)
def test_steps_and_state_match_reference(options):
    import transformers

    ours, ours_opt, _ = _run(loom.Adafactor, options)
    ref, ref_opt, _ = _run(transformers.Adafactor, options)
    assert ours_opt.defaults == ref_opt.defaults
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        sa, sb = ours_opt.state[a], ref_opt.state[b]
        assert sorted(sa) == sorted(sb) and sa["step"] == sb["step"] == 4
        for key in sb:
            torch.testing.assert_close(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]), rtol=1e-6, atol=1e-7)


def test_schedule_reports_the_rate_adafactor_used():
    import transformers

    _, _, ours = _run(loom.Adafactor, {}, scheduler=loom.AdafactorSchedule)
    _, _, ref = _run(transformers.Adafactor, {}, scheduler=transformers.optimization.AdafactorSchedule)
    assert ours == pytest.approx(ref, rel=1e-6) and ours[0] != ours[-1]


def test_trainer_adafactor_is_the_references():
    import transformers

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8)))
    ours = create_optimizer(models[0], TrainingArguments(optim="adafactor", learning_rate=1e-3))
    args = transformers.TrainingArguments(output_dir="unused", optim="adafactor", learning_rate=1e-3, use_cpu=True)
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, models[1])
    ref = cls(models[1].parameters(), **kwargs)
    assert isinstance(ours, loom.Adafactor) and ours.defaults == ref.defaults
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="lr=0.1 and relative_step=True both set the step size"):
        loom.Adafactor(_params(), lr=0.1)
    with pytest.raises(ValueError, match="warmup_init=True .* needs relative_step=True"):
        loom.Adafactor(_params(), lr=0.1, relative_step=False, warmup_init=True)
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        loom.Adafactor(emb.parameters()).step()


@pytest.mark.parametrize("kwargs", [dict(num_training_steps=10, num_decay_steps=2),
                                    dict(num_training_steps=12, num_decay_steps=4, warmup_type="cosine",
                                         decay_type="1-sqrt", min_lr_ratio=0.1),
                                    dict(num_stable_steps=3, num_decay_steps=3, decay_type="linear",
                                         min_lr_ratio=0.2)])
def test_wsd_schedule_matches_reference(kwargs):
    import transformers

    rates = []
    for module in (loom, transformers):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=10.0)
        schedule = module.get_wsd_schedule(opt, num_warmup_steps=2, **kwargs)
        steps = []
        for _ in range(14):
            steps.append(schedule.get_last_lr()[0])
            opt.step()
            schedule.step()
        rates.append(steps)
    assert rates[0] == pytest.approx(rates[1], rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="needs num_training_steps or num_stable_steps"):
        loom.get_wsd_schedule(opt, num_warmup_steps=2, num_decay_steps=2)
