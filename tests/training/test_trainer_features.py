"""Trainer features switched on by TrainingArguments, checked against the reference where it defines the result."""
from __future__ import annotations

import pytest
import torch

from loom.training import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from loom.training.data import LengthGroupedSampler, get_length_grouped_indices
from tests.training.conftest import PadCollator, cls_rows, lm_rows, tiny_bert, tiny_llama


def _batch(rows):
    return PadCollator()(rows)


@pytest.mark.parametrize("family, ref_class, accumulated", [
    ("llama", "LlamaForCausalLM", False), ("llama", "LlamaForCausalLM", True),
    ("bert", "BertForSequenceClassification", True)])
def test_label_smoothing_loss_equals_reference(tmp_path_factory, family, ref_class, accumulated):
    import transformers

    import loom
    from tests.loomtest import reference_checkpoint

    path, ref = reference_checkpoint(tmp_path_factory, family, ref_class)
    ours = getattr(loom, ref_class).from_pretrained(path).eval()
    if family == "llama":
        inputs = _batch(lm_rows(4))
    else:
        rows = cls_rows(4)
        inputs = {"input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.tensor([0, 1, 1, 0])}
    items = torch.tensor(17) if accumulated else None
    ref_trainer = transformers.Trainer(ref, transformers.TrainingArguments(
        output_dir=str(path / "ref"), label_smoothing_factor=0.1, use_cpu=True, report_to="none"))
    trainer = Trainer(ours, TrainingArguments(output_dir=str(path / "ours"), label_smoothing_factor=0.1))
    expected = ref_trainer.compute_loss(ref, dict(inputs), num_items_in_batch=items)
    got = trainer.compute_loss(ours, dict(inputs), num_items_in_batch=items)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    plain = Trainer(ours, TrainingArguments(output_dir=str(path / "plain"))).compute_loss(ours, dict(inputs))
    assert abs(plain.item() - got.item()) > 1e-4  # smoothing changes the loss
    if family == "llama" and not accumulated:  # evaluation reports the smoothed loss too, as the reference
        rows = lm_rows(6)
        ref_trainer.data_collator = trainer.data_collator = PadCollator()
        torch.testing.assert_close(trainer.evaluate(rows)["eval_loss"], ref_trainer.evaluate(rows)["eval_loss"],
                                   rtol=1e-5, atol=1e-6)


def test_neftune_noise_is_the_reference_formula_and_only_in_training(args_for):
    from transformers.integrations.neftune import neftune_post_forward_hook

    from loom.training.trainer_features import _neftune_hook

    emb = torch.nn.Embedding(50, 16)
    emb.neftune_noise_alpha = 5.0
    out = emb(torch.randint(0, 50, (2, 7)))
    torch.manual_seed(3)
    ours = _neftune_hook(emb, None, out)
    torch.manual_seed(3)
    torch.testing.assert_close(ours, neftune_post_forward_hook(emb, None, out), rtol=0, atol=0)
    assert not torch.equal(ours, out)
    emb.eval()
    assert torch.equal(_neftune_hook(emb, None, out), out)

    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            ids = torch.tensor([[5, 6, 7]])
            seen.append(torch.equal(model.get_input_embeddings()(ids), model.get_input_embeddings()(ids)))

    model = tiny_llama()
    trainer = Trainer(model, args_for(max_steps=2, neftune_noise_alpha=5.0), train_dataset=lm_rows(8),
                      data_collator=PadCollator(), callbacks=[Probe()])
    trainer.train()
    assert seen == [False, False]  # noisy (and random) while training
    assert not model.get_input_embeddings()._forward_hooks  # removed afterwards


def test_auto_find_batch_size_retries_like_a_run_with_the_smaller_batch(args_for):
    class FakeOOM(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if args.per_device_train_batch_size > 6:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    common = dict(max_steps=3, learning_rate=1e-2)
    model = tiny_llama()
    trainer = Trainer(model, args_for(per_device_train_batch_size=8, auto_find_batch_size=True, **common),
                      train_dataset=lm_rows(24), data_collator=PadCollator(), callbacks=[FakeOOM()])
    with pytest.warns(UserWarning, match="auto_find_batch_size") as caught:
        trainer.train()
    assert [str(w.message).split("; ")[1] for w in caught] == ["retrying with 7", "retrying with 6"]
    assert trainer.args.per_device_train_batch_size == 6  # 8 -> 7 -> 6, the reference's 0.9 factor
    direct = tiny_llama()
    Trainer(direct, args_for(per_device_train_batch_size=6, **common), train_dataset=lm_rows(24),
            data_collator=PadCollator()).train()
    for (name, a), b in zip(model.named_parameters(), direct.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    class OtherError(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        Trainer(tiny_llama(), args_for(auto_find_batch_size=True, **common), train_dataset=lm_rows(8),
                data_collator=PadCollator(), callbacks=[OtherError()]).train()


def test_save_only_model_checkpoints_cannot_resume(args_for, tmp_path):
    args = args_for(max_steps=2, save_strategy="steps", save_steps=2, save_only_model=True)
    Trainer(tiny_llama(), args, train_dataset=lm_rows(8), data_collator=PadCollator()).train()
    folder = tmp_path / "out" / "checkpoint-2"
    assert (folder / "model.safetensors").is_file() and not (folder / "optimizer.pt").exists()
    assert not (folder / "rng_state.pth").exists() and not (folder / "scheduler.pt").exists()
    with pytest.raises(ValueError, match="save_only_model=True: it holds the model weights but no optimizer"):
        Trainer(tiny_llama(), args_for(max_steps=4), train_dataset=lm_rows(8),
                data_collator=PadCollator()).train(resume_from_checkpoint=str(folder))


def test_input_tokens_seen(args_for):
    rows = lm_rows(8)
    for mode in ("all", "non_padding"):
        trainer = Trainer(tiny_llama(), args_for(num_train_epochs=1, per_device_train_batch_size=4,
                                                 train_sampling_strategy="sequential",
                                                 include_num_input_tokens_seen=mode),
                          train_dataset=rows, data_collator=PadCollator())
        trainer.train()
        batches = [_batch(rows[:4]), _batch(rows[4:])]
        counts = [b["input_ids"].numel() if mode == "all" else int(b["attention_mask"].sum()) for b in batches]
        assert trainer.state.num_input_tokens_seen == sum(counts)
        assert [h["num_input_tokens_seen"] for h in trainer.state.log_history[:2]] == [counts[0], sum(counts)]
        assert trainer.state.log_history[-1]["train_tokens_per_second"] > 0
    assert sum(len(r["input_ids"]) for r in rows) == sum(counts)


def test_dataloader_worker_options(args_for):
    args = args_for(dataloader_num_workers=2, dataloader_persistent_workers=True, dataloader_prefetch_factor=3,
                    dataloader_multiprocessing_context="spawn")
    loader = Trainer(tiny_llama(), args, train_dataset=lm_rows(8), data_collator=PadCollator()).get_train_dataloader()
    assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (2, True, 3)
    assert loader.multiprocessing_context.get_start_method() == "spawn"


def test_length_grouped_order_equals_reference():
    from transformers.trainer_pt_utils import LengthGroupedSampler as RefSampler

    lengths = [int(x) for x in torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    for batch_size in (4, 16):
        ref = list(RefSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(7)))
        ours = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(7)))
        assert ours == ref
    rows = [{"input_ids": [1] * n} for n in lengths[:50]]
    assert list(LengthGroupedSampler(4, dataset=rows, generator=torch.Generator().manual_seed(1))) == \
        list(RefSampler(4, dataset=rows, generator=torch.Generator().manual_seed(1)))
    assert get_length_grouped_indices([3], 4) == [0]


def test_group_by_length_in_the_trainer_is_seeded_and_skippable(args_for):
    rows = lm_rows(40, min_len=2, max_len=30)
    trainer = Trainer(tiny_llama(), args_for(train_sampling_strategy="group_by_length", per_device_train_batch_size=4),
                      train_dataset=rows, data_collator=PadCollator())
    sampler = trainer.get_train_dataloader().sampler
    order = list(sampler)
    assert sorted(order) == list(range(40)) and order == list(sampler)
    assert len(rows[order[0]]["input_ids"]) == max(len(r["input_ids"]) for r in rows)  # longest first
    sampler.set_epoch(0, skip=8)
    assert list(sampler) == order[8:]
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError, match="group_by_length' needs the length of each example"):
        Trainer(tiny_bert(), args_for(train_sampling_strategy="group_by_length"),
                train_dataset=[{"x": 1}]).get_train_dataloader()


def test_compile_options_reach_torch_compile(args_for, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    trainer = Trainer(tiny_llama(), args_for(torch_compile_mode="reduce-overhead", torch_compile_backend="eager"))
    trainer.wrap_model(trainer.model)
    assert calls == [{"backend": "eager", "mode": "reduce-overhead"}]


def test_gradient_checkpointing_kwargs_reach_checkpoint(args_for, monkeypatch):
    import torch.utils.checkpoint as tc

    seen, real = [], tc.checkpoint
    monkeypatch.setattr(tc, "checkpoint", lambda fn, *a, **kw: seen.append(kw.get("use_reentrant")) or
                        real(fn, *a, **kw))
    model = tiny_llama()
    Trainer(model, args_for(max_steps=1, gradient_checkpointing=True,
                            gradient_checkpointing_kwargs={"use_reentrant": True}),
            train_dataset=lm_rows(4), data_collator=PadCollator()).train()
    assert seen and set(seen) == {True}
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs \['reentrant'\] are not options"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"reentrant": True})


def test_eval_delay_and_eval_on_start(args_for):
    trainer = Trainer(tiny_bert(), args_for(max_steps=6, eval_strategy="steps", eval_steps=2, eval_delay=3,
                                            eval_on_start=True),
                      train_dataset=cls_rows(16), eval_dataset=cls_rows(4))
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [0, 4, 6]


class TupleModel(torch.nn.Module):
    """A plain module returning (loss, logits) when given labels; a nan `poison` makes the loss nan (not the
    gradients of the weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x, labels=None, poison=None):
        logits = self.linear(x)
        if labels is None:
            return (logits,)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return (loss if poison is None else loss + poison.sum(), logits)


def _tuple_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, generator=g), "labels": torch.tensor(i % 2)} for i in range(n)]


def test_tuple_models_keep_their_eval_loss_for_best_model_and_early_stopping(args_for):
    args = args_for(max_steps=30, learning_rate=0.0, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                    save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss")
    trainer = Trainer(TupleModel(), args, train_dataset=_tuple_rows(8), eval_dataset=_tuple_rows(4, 1),
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    assert "eval_loss" in trainer.evaluate()
    trainer.train()
    assert trainer.state.global_step == 6 and trainer.state.best_global_step == 2
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")


def test_nan_losses_are_kept_out_of_the_logs(args_for):
    rows = [{**r, "poison": torch.tensor(0.0)} for r in _tuple_rows(8)]
    rows[5]["poison"] = torch.tensor(float("nan"))
    model = TupleModel()
    with torch.no_grad():
        step = [float(model(r["x"][None], r["labels"][None])[0]) for r in rows]
    for keep_out in (True, False):
        trainer = Trainer(TupleModel(), args_for(max_steps=8, per_device_train_batch_size=1, learning_rate=0.0,
                                                 logging_steps=4, train_sampling_strategy="sequential",
                                                 per_device_eval_batch_size=1,
                                                 logging_nan_inf_filter=keep_out), train_dataset=rows)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert losses[0] == pytest.approx(sum(step[:4]) / 4)
        if keep_out:  # the reference's rule: a nan step counts as the mean of the steps since the last log
            assert losses[1] == pytest.approx((step[4] * 1.5 + step[6] + step[7]) / 4)
        else:
            assert losses[1] != losses[1]
        eval_loss = trainer.evaluate(rows)["eval_loss"]
        assert (eval_loss == pytest.approx(sum(step[:5] + step[6:]) / 7)) if keep_out else eval_loss != eval_loss


class Stream(torch.utils.data.IterableDataset):
    """Rows from a generator (no length); set_epoch reshuffles each pass, as datasets' IterableDataset does."""

    def __init__(self, rows):
        self.rows, self.epoch = rows, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.epoch)).tolist()
        return (self.rows[i] for i in order)


def test_iterable_dataset_trains_and_resumes_exactly(args_for, tmp_path):
    rows = lm_rows(10)
    # 10 rows in batches of 2 with accumulation 2: 2.5 steps a pass, so 7 steps span three passes
    common = dict(max_steps=7, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_strategy="steps",
                  save_steps=3, learning_rate=3e-3)
    full = tiny_llama()
    full_trainer = Trainer(full, args_for(**common), train_dataset=Stream(rows), data_collator=PadCollator())
    full_trainer.train()
    first_losses = [h["loss"] for h in full_trainer.state.log_history if "loss" in h]
    resumed = tiny_llama(seed=5)
    trainer = Trainer(resumed, args_for(**common), train_dataset=Stream(rows), data_collator=PadCollator())
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == first_losses
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="IterableDataset .* needs max_steps > 0"):
        Trainer(tiny_llama(), args_for(), train_dataset=Stream(rows), data_collator=PadCollator()).train()
    with pytest.raises(ValueError, match="the training IterableDataset yields no examples"):
        Trainer(tiny_llama(), args_for(max_steps=2), train_dataset=Stream([]), data_collator=PadCollator()).train()


@pytest.mark.parametrize("scores", [[0.5, 0.9, 0.3, 0.4, 0.2], [0.1, 0.2, 0.3, 0.4, 0.5]])
def test_save_total_limit_one_with_best_model_keeps_what_the_reference_keeps(tmp_path, scores):
    import transformers

    from tests.loomtest import TINY

    def run(trainer_cls, args_cls, model, folder):
        args = args_cls(output_dir=str(folder), max_steps=5, eval_strategy="steps", eval_steps=1, save_steps=1,
                        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="score",
                        logging_steps=1, learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True,
                        per_device_train_batch_size=4)
        trainer = trainer_cls(model, args, train_dataset=cls_rows(8), eval_dataset=cls_rows(4),
                              compute_metrics=lambda p: {"score": ([0.0] + scores)[trainer.state.global_step]})
        trainer.train()
        return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")), \
            trainer.state.best_model_checkpoint.rsplit("/", 1)[-1]

    torch.manual_seed(0)
    ref_model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY["bert"]))
    expected = run(transformers.Trainer, transformers.TrainingArguments, ref_model, tmp_path / "ref")
    assert run(Trainer, TrainingArguments, tiny_bert(), tmp_path / "ours") == expected


@pytest.mark.parametrize("concat", [True, False])
def test_include_for_metrics_and_unconcatenated_batches_match_reference(tmp_path_factory, concat):
    import numpy as np
    import transformers

    import loom
    from tests.loomtest import reference_checkpoint

    path, ref = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")
    seen = {}

    def capture(key):
        def compute_metrics(p):
            seen[key] = p
            return {"n": 1.0}
        return compute_metrics

    common = dict(per_device_eval_batch_size=3, include_for_metrics=["inputs", "loss"], eval_do_concat_batches=concat,
                  report_to="none", use_cpu=True)
    rows = lm_rows(7)
    transformers.Trainer(ref, transformers.TrainingArguments(output_dir=str(path / "r"), **common),
                         data_collator=PadCollator(), compute_metrics=capture("ref")).evaluate(rows)
    Trainer(loom.LlamaForCausalLM.from_pretrained(path), TrainingArguments(output_dir=str(path / "o"), **common),
            data_collator=PadCollator(), compute_metrics=capture("ours")).evaluate(rows)
    for field in ("predictions", "label_ids", "inputs", "losses"):
        ours, expected = getattr(seen["ours"], field), getattr(seen["ref"], field)
        if concat:
            ours, expected = [ours], [expected]
        assert isinstance(ours, list) and len(ours) == len(expected) == (1 if concat else 3), field
        for a, b in zip(ours, expected):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=field)


def test_full_determinism_bf16_full_eval_and_use_cache(args_for):
    model = tiny_bert()
    dtypes = []

    class During(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            dtypes.append(next(model.parameters()).dtype)

    trainer = Trainer(model, args_for(max_steps=2, eval_strategy="steps", eval_steps=2, full_determinism=True,
                                      bf16_full_eval=True), train_dataset=cls_rows(8), eval_dataset=cls_rows(4),
                      callbacks=[During()])
    assert model.config.use_cache is False  # the reference's default: no KV cache while training
    try:
        trainer.train()
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert dtypes == [torch.float32]  # in training, evaluation leaves the model as it is
    fp32_loss = trainer.state.log_history[-2]["eval_loss"]
    bf16_loss = trainer.evaluate()["eval_loss"]
    assert next(model.parameters()).dtype == torch.bfloat16  # outside it, the model is cast
    assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2) and bf16_loss != fp32_loss
    assert Trainer(tiny_bert(), args_for(use_cache=True)).model.config.use_cache is True


def test_ignore_data_skip_restarts_the_epochs_order(args_for, tmp_path):
    seen = []

    class Recording(PadCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            seen.append(batch["input_ids"][:, 0].tolist())
            return batch

    common = dict(per_device_train_batch_size=2, num_train_epochs=1, save_strategy="steps", save_steps=2)
    Trainer(tiny_llama(), args_for(**common), train_dataset=lm_rows(8), data_collator=Recording()).train()
    first_run, seen[:] = seen[1:], []  # seen[0] is the preflight's batch
    Trainer(tiny_llama(), args_for(ignore_data_skip=True, **common), train_dataset=lm_rows(8),
            data_collator=Recording()).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert seen[1:] == first_run[:2]  # steps 3 and 4 see the epoch's first batches again


def test_parallel_runs_refuse_what_they_cannot_shard(args_for, monkeypatch):
    from types import SimpleNamespace

    parallel = SimpleNamespace(enabled=True)
    with pytest.raises(ValueError, match="train_sampling_strategy='sequential' is not supported under torchrun"):
        Trainer._train_sampler(SimpleNamespace(args=args_for(train_sampling_strategy="sequential"), parallel=parallel),
                               None)
    trainer = Trainer(tiny_llama(), args_for(max_steps=2), train_dataset=Stream(lm_rows(4)),
                      data_collator=PadCollator())
    monkeypatch.setattr(trainer, "_parallel_sizes", lambda: (2, 2))
    with pytest.raises(ValueError, match="IterableDataset is not sharded over data-parallel ranks"):
        trainer.train()


@pytest.mark.parametrize("schedule", ["reduce_lr_on_plateau", "greedy"])
def test_metric_driven_schedules_in_training_match_reference(tmp_path, schedule):
    import transformers

    from tests.loomtest import TINY

    def learning_rates(trainer_cls, args_cls, model, folder):
        args = args_cls(output_dir=str(folder), max_steps=8, eval_strategy="steps", eval_steps=2,
                        lr_scheduler_type=schedule, lr_scheduler_kwargs={"patience": 0, "factor": 0.5},
                        metric_for_best_model="score", greater_is_better=False, logging_steps=1, learning_rate=1e-3,
                        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", eval_on_start=True)
        trainer = trainer_cls(model, args, train_dataset=cls_rows(8), eval_dataset=cls_rows(4),
                              compute_metrics=lambda p: {"score": 1.0})
        trainer.train()
        return [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]

    torch.manual_seed(0)
    ref_model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY["bert"]))
    expected = learning_rates(transformers.Trainer, transformers.TrainingArguments, ref_model, tmp_path / "r")
    assert expected[-1] < max(expected)  # the constant metric is a plateau
    assert learning_rates(Trainer, TrainingArguments, tiny_bert(), tmp_path / "o") == expected


def test_empty_cache_every_n_steps(args_for, monkeypatch):
    from loom.training import trainer_features

    calls = []
    monkeypatch.setattr(trainer_features, "empty_device_cache", lambda device: calls.append(device.type))
    trainer = Trainer(tiny_bert(), args_for(max_steps=6, torch_empty_cache_steps=2), train_dataset=cls_rows(8))
    trainer.train()
    assert calls == ["cpu"] * 3


def test_a_streaming_datasets_iterable_trains(args_for):
    datasets = pytest.importorskip("datasets")

    class Strict(PadCollator):
        def __call__(self, features):
            assert {k for f in features for k in f} == {"input_ids", "attention_mask", "labels"}
            return super().__call__(features)

    rows = [{**r, "text": "unused"} for r in lm_rows(10)]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    trainer = Trainer(tiny_llama(), args_for(max_steps=3, per_device_train_batch_size=4), train_dataset=stream,
                      data_collator=Strict())
    assert trainer.train().global_step == 3  # 'text' is not an input of the model: dropped before collating
