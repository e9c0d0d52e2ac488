"""Trainer: exact gradient accumulation, learning, evaluation/prediction, callbacks, search, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from loom.training import EarlyStoppingCallback, Trainer, TrainerCallback
from tests.training.conftest import PadCollator, cls_rows, lm_rows, tiny_bert, tiny_llama


def _accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def _run(model, args, rows, collator=None):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, args, train_dataset=rows, data_collator=collator)
    trainer.train()
    deltas = {n: p.detach().cpu() - before[n] for n, p in model.named_parameters()}
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], deltas


@pytest.mark.parametrize("kind", ["causal_lm", "sequence_classification", "token_classification"])
def test_gradient_accumulation_equals_one_big_batch(args_for, kind):
    """8 examples in one batch vs 4 micro-batches of 2, then a short final window (10 examples): same updates."""
    if kind == "causal_lm":
        make, rows, collator = tiny_llama, lm_rows(10), PadCollator()
    elif kind == "sequence_classification":
        make, rows, collator = tiny_bert, cls_rows(10), None
    else:
        make = lambda: tiny_bert("BertForTokenClassification")  # noqa: E731
        rows = [{**r, "labels": [-100 if t % 3 == 0 else t % 2 for t in r["labels"]]} for r in lm_rows(10)]
        collator = PadCollator()
    common = dict(optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0, num_train_epochs=1)
    big_losses, big = _run(make(), args_for(per_device_train_batch_size=8, **common), rows, collator)
    acc_losses, acc = _run(make(), args_for(per_device_train_batch_size=2, gradient_accumulation_steps=4, **common),
                           rows, collator)
    assert len(big_losses) == len(acc_losses) == 2
    assert acc_losses == pytest.approx(big_losses, abs=1e-6)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(d.abs().max() > 1e-3 for d in big.values()), "the updates must be non-trivial"


def test_loss_falls_and_metrics_stream(args_for):
    rows, held_out = cls_rows(64), cls_rows(32, seed=9)
    args = args_for(num_train_epochs=3, per_device_train_batch_size=16, learning_rate=1e-2, logging_steps=4,
                    eval_strategy="epoch", warmup_ratio=0.1, weight_decay=0.01)
    trainer = Trainer(tiny_bert(), args, train_dataset=rows, eval_dataset=held_out, compute_metrics=_accuracy)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert len(evals) == 3 and evals[-1]["eval_accuracy"] >= 0.9
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert {"loss", "learning_rate", "grad_norm", "epoch", "step", "steps_per_second"} <= set(logged)
    assert result.global_step == 12 and result.metrics["train_steps_per_second"] > 0
    # predictions stream through preprocess_logits_for_metrics; batch_eval_metrics sees one batch at a time
    trainer.preprocess_logits_for_metrics = lambda logits, labels: logits.argmax(-1)
    out = trainer.predict(held_out)
    assert out.predictions.shape == (32,) and out.label_ids.shape == (32,)
    seen = []

    def per_batch(pred, compute_result):
        seen.append(len(pred.label_ids))
        per_batch.correct = getattr(per_batch, "correct", 0) + int((pred.predictions == pred.label_ids).sum())
        return {"accuracy": per_batch.correct / sum(seen)} if compute_result else {}

    trainer.compute_metrics = per_batch
    trainer.args.batch_eval_metrics = True
    assert trainer.evaluate()["eval_accuracy"] == pytest.approx(float((out.predictions == out.label_ids).mean()))
    assert seen == [8, 8, 8, 8]


def test_early_stopping_and_jsonl_log(args_for):
    args = args_for(max_steps=40, learning_rate=0.0, eval_strategy="steps", eval_steps=2, metric_for_best_model="loss",
                    report_to="jsonl")
    trainer = Trainer(tiny_bert(), args, train_dataset=cls_rows(16), eval_dataset=cls_rows(8),
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    assert trainer.state.global_step == 6  # best at step 2, no improvement at 4 and 6
    lines = (trainer.args.output_dir + "/logs.jsonl")
    records = [json.loads(x) for x in open(lines, encoding="utf-8")]
    assert len(records) == len(trainer.state.log_history) and records[0]["step"] == 1


def test_callback_events_in_order(args_for):
    events = []

    class Recorder(TrainerCallback):
        def __getattribute__(self, name):
            if name.startswith("on_"):
                return lambda *a, **k: events.append(name)
            return super().__getattribute__(name)

    Trainer(tiny_bert(), args_for(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                  logging_steps=2), train_dataset=cls_rows(16), callbacks=[Recorder()]).train()
    assert events[:8] == ["on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_substep_end",
                          "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
    assert events.count("on_step_end") == 2 and events.count("on_log") == 2 and events[-1] == "on_train_end"


def test_hyperparameter_search_with_optuna(args_for):
    pytest.importorskip("optuna", reason="optuna is the optional search backend")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trainer = Trainer(model_init=lambda: tiny_bert(), args=args_for(max_steps=2, per_device_train_batch_size=8),
                      train_dataset=cls_rows(16), eval_dataset=cls_rows(8))
    best = trainer.hyperparameter_search(hp_space=lambda t: {"learning_rate": t.suggest_float("learning_rate", 1e-4,
                                                                                             1e-2, log=True)},
                                         n_trials=2, direction="minimize")
    assert set(best.hyperparameters) == {"learning_rate"} and best.objective > 0
    assert len(best.run_summary.trials) == 2


# -- bad input: a clear error before any training step ---------------------------------------------------------------
class _NoStep(TrainerCallback):
    def on_step_begin(self, *a, **k):
        raise AssertionError("a training step ran before the error")


def _fails_before_training(args, rows, error, match, **kwargs):
    trainer = Trainer(kwargs.pop("model", None) or tiny_bert(), args, train_dataset=rows, callbacks=[_NoStep()],
                      **kwargs)
    with pytest.raises(error, match=match):
        trainer.train()


def test_dataset_without_labels(args_for):
    rows = [{k: v for k, v in r.items() if k != "label"} for r in cls_rows(8)]
    _fails_before_training(args_for(max_steps=1), rows, ValueError, "the training batches have no labels")


def test_collator_returning_non_tensors(args_for):
    _fails_before_training(args_for(max_steps=1), cls_rows(8), TypeError, r"non-tensor values for \{'input_ids'",
                           data_collator=lambda f: {"input_ids": [x["input_ids"] for x in f]})


def test_metric_never_returned(args_for):
    args = args_for(max_steps=4, eval_strategy="steps", eval_steps=2, metric_for_best_model="f1")
    _fails_before_training(args, cls_rows(8), ValueError, "metric_for_best_model='f1' is never returned",
                           eval_dataset=cls_rows(4), compute_metrics=_accuracy)


def test_non_dict_dataset_and_empty_dataset(args_for):
    with pytest.raises(TypeError, match="a list dataset must hold dicts"):
        Trainer(tiny_bert(), args_for(), train_dataset=[1, 2, 3])
    _fails_before_training(args_for(max_steps=1, dataloader_drop_last=True, per_device_train_batch_size=8),
                           cls_rows(4), ValueError, "yields no batches")


@pytest.mark.parametrize("greater", [True, False])
def test_early_stopping_check_metric_value_counts_as_the_reference(greater):
    import types

    import transformers

    args = types.SimpleNamespace(greater_is_better=greater)
    ours, ref = EarlyStoppingCallback(3, 0.1), transformers.EarlyStoppingCallback(3, 0.1)
    for best, value in [(None, 1.0), (1.0, 1.05), (1.0, 1.2), (1.0, 0.8), (1.0, 1.0)]:
        state = types.SimpleNamespace(best_metric=best)
        ours.check_metric_value(args, state, None, value)
        ref.check_metric_value(args, state, None, value)
        assert ours.early_stopping_patience_counter == ref.early_stopping_patience_counter, (best, value)
