"""Checkpoints: exact resume (in process, and after SIGKILL), atomic saves, rotation, reference loading, errors."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from loom.training import Trainer, TrainerCallback
from loom.training.checkpoints import latest_checkpoint, list_checkpoints, write_checkpoint
from tests.training.conftest import cls_rows, lm_rows, PadCollator, resume_args, tiny_bert, tiny_llama

SCRIPT = Path(__file__).with_name("resume_script.py")
REPO = SCRIPT.parents[2]


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _train(output_dir, resume=None):
    trainer = Trainer(tiny_bert(hidden_dropout_prob=0.1), resume_args(str(output_dir)), train_dataset=cls_rows(20))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return _train(tmp_path_factory.mktemp("full"))


@pytest.mark.parametrize("checkpoint", ["checkpoint-2", "checkpoint-4", "checkpoint-6"])
def test_resume_is_bit_exact(uninterrupted, checkpoint):
    """Resuming mid-epoch (2, 4: inside epochs 0 and 1) or at an epoch end (6) replays the same losses exactly."""
    resumed = _train(uninterrupted.args.output_dir, resume=str(Path(uninterrupted.args.output_dir) / checkpoint))
    full = _losses(uninterrupted)
    again = _losses(resumed)
    assert sorted(again) == sorted(full) and again == full  # restored history + replayed steps, bit for bit
    for (name, a), b in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def _run_script(output_dir, *flags):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(output_dir), *flags], capture_output=True, text=True,
                          timeout=240, env=env, cwd=REPO)
    records = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("LOSS ")]
    losses = {r["step"]: r["loss"] for r in records}
    return proc.returncode, losses, proc.stderr


def test_sigkill_mid_epoch_and_while_saving_then_resume(uninterrupted, tmp_path):
    """Killed at step 5 (inside epoch 1, before its log), resumed and killed while saving checkpoint-6, resumed:
    every loss any of the processes logged equals the uninterrupted run's (the same run, in this process)."""
    full = _losses(uninterrupted)
    out = tmp_path / "killed"
    rc, first, _ = _run_script(out, "--kill-at-step", "5")
    assert rc == -9 and sorted(first) == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    rc, second, _ = _run_script(out, "--resume", "--kill-while-saving", "6")
    assert rc == -9 and sorted(second) == [5, 6]
    assert (out / "tmp-checkpoint-6").is_dir(), "the interrupted save leaves only a temporary folder"
    assert latest_checkpoint(out).name == "checkpoint-4"
    rc, third, err = _run_script(out, "--resume")
    assert rc == 0, err
    assert sorted(third) == [5, 6, 7, 8]
    for losses in (first, second, third):
        assert all(losses[s] == full[s] for s in losses), (losses, full)
    assert not (out / "tmp-checkpoint-6").exists()


def test_kill_between_the_renames_of_a_resave_then_resume(uninterrupted, tmp_path, monkeypatch):
    """A resumed run saves checkpoint-4 again and dies between moving the old checkpoint-4 aside and renaming the
    new one in (an injected failure of that rename): resuming finds checkpoint-4 again, the newer complete copy,
    says so, and replays the uninterrupted run's losses."""
    out = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(Path(uninterrupted.args.output_dir) / name, out / name)
    (out / "checkpoint-4" / "the-old-copy").touch()
    real_replace = os.replace

    def die_between_renames(src, dst, *args, **kwargs):
        if Path(src).name.startswith("tmp-checkpoint-4") and Path(dst).name == "checkpoint-4":
            raise OSError(errno.EIO, "injected: killed between the renames")
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", die_between_renames)
        with pytest.raises(OSError, match="injected"):
            _train(out, resume=str(out / "checkpoint-2"))
    assert not (out / "checkpoint-4").exists()
    with pytest.warns(UserWarning, match=r"checkpoint-4: finished a save that an interrupted run left half-done \(the "
                                         "complete copy tmp-checkpoint-4-new is now in place\)"):
        resumed = _train(out, resume=True)
    assert _losses(resumed) == _losses(uninterrupted)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert not (out / "checkpoint-4" / "the-old-copy").exists()


def _leave(root: Path, folders: dict[str, str]) -> None:
    for name, copy in folders.items():
        (root / name).mkdir(parents=True)
        (root / name / "copy").write_text(copy)


@pytest.mark.parametrize("left,restored", [
    ({"tmp-checkpoint-4-new": "new", "tmp-checkpoint-4-old": "old"}, "new"),  # killed between the two renames
    ({"tmp-checkpoint-4": "new", "tmp-checkpoint-4-old": "old"}, "new"),  # the same, by loom before the -new stage
    ({"tmp-checkpoint-4-old": "old"}, "old"),
    ({"checkpoint-4": "old", "tmp-checkpoint-4-new": "new"}, "new"),  # killed before the old copy moved aside
    ({"checkpoint-4": "new", "tmp-checkpoint-4-old": "old"}, None),  # killed while deleting the old copy
    ({"tmp-checkpoint-4": "partial"}, None),  # killed while writing: never taken for a checkpoint
])
def test_leftovers_of_an_interrupted_save_are_recovered_at_resume(tmp_path, left, restored):
    _leave(tmp_path, {"checkpoint-2": "older step", **left})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = latest_checkpoint(tmp_path)
    assert [str(w.message).split(":")[0] for w in caught] == ([str(tmp_path / "checkpoint-4")] if restored else [])
    leftover = sorted(p.name for p in tmp_path.iterdir())
    if "checkpoint-4" in left or restored:
        assert leftover == ["checkpoint-2", "checkpoint-4"]
        assert (latest / "copy").read_text() == (restored or left["checkpoint-4"])
    else:
        assert latest.name == "checkpoint-2" and leftover == ["checkpoint-2", "tmp-checkpoint-4"]


def test_a_failing_save_after_a_kill_keeps_the_complete_copy(tmp_path):
    """The issue's state (a complete tmp-checkpoint-4 and tmp-checkpoint-4-old, no checkpoint-4), then another save
    of step 4 that fails while writing (a full disk): the complete copy was put in place first, not deleted."""
    _leave(tmp_path, {"tmp-checkpoint-4": "new", "tmp-checkpoint-4-old": "old"})

    def disk_full(folder):
        (folder / "optimizer.pt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.warns(UserWarning, match="checkpoint-4: finished a save"), pytest.raises(OSError, match="No space"):
        write_checkpoint(tmp_path, 4, disk_full)
    assert (tmp_path / "checkpoint-4" / "copy").read_text() == "new"
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"


def test_checkpoint_loads_in_reference_with_equal_logits(args_for):
    import transformers

    x = torch.randint(3, 99, (2, 7))
    for model, rows, collator, ref_class in (
            (tiny_bert(), cls_rows(8), None, transformers.BertForSequenceClassification),
            (tiny_llama(), lm_rows(8), PadCollator(), transformers.LlamaForCausalLM)):
        trainer = Trainer(model, args_for(max_steps=2, save_steps=2, save_strategy="steps",
                                          per_device_train_batch_size=4), train_dataset=rows, data_collator=collator)
        trainer.train()
        path = Path(trainer.args.output_dir) / "checkpoint-2"
        ref = ref_class.from_pretrained(path).eval()
        loaded = type(model).from_pretrained(path)
        model.cpu()  # trained on whatever device args chose; compare on the CPU
        with torch.no_grad():
            expected = model.eval()(input_ids=x).logits
            torch.testing.assert_close(ref(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=0, atol=0)
        for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.json"):
            assert (path / f).is_file(), f
        ref_state = transformers.TrainerState.load_from_json(str(path / "trainer_state.json"))
        assert ref_state.global_step == 2


def test_rotation_keeps_best_and_best_is_loaded_at_end(args_for):
    trainer = None

    def falling_metric(pred):  # best at the first evaluation, worse afterwards
        return {"score": -float(trainer.state.global_step)}

    args = args_for(max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                    save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="score")
    out = Path(args.output_dir)
    kept = []

    class Saved(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            kept.append([p.name for p in list_checkpoints(out)])

    trainer = Trainer(tiny_bert(), args, train_dataset=cls_rows(16), eval_dataset=cls_rows(4),
                      compute_metrics=falling_metric, callbacks=[Saved()])
    trainer.train()
    # the latest stays beside the best while training (for resuming); at the end only the best is left (reference)
    assert kept[-1] == ["checkpoint-2", "checkpoint-8"]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2") and trainer.state.best_global_step == 2
    best = type(trainer.model).from_pretrained(out / "checkpoint-2")
    for (name, a), b in zip(trainer.model.state_dict().items(), best.state_dict().values()):
        assert torch.equal(a.cpu(), b), name


def test_bad_checkpoints_fail_before_training(uninterrupted, tmp_path):
    broken = tmp_path / "checkpoint-4"
    import shutil

    shutil.copytree(Path(uninterrupted.args.output_dir) / "checkpoint-4", broken)
    (broken / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-4 is incomplete \(missing optimizer.pt\)"):
        _train(tmp_path / "x", resume=str(broken))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-N folder"):
        _train(tmp_path / "empty", resume=True)
    other = Trainer(tiny_bert(hidden_size=48), resume_args(str(tmp_path / "y")), train_dataset=cls_rows(20))
    with pytest.raises(ValueError, match="holds the weights of another model"):
        other.train(resume_from_checkpoint=str(Path(uninterrupted.args.output_dir) / "checkpoint-4"))
    moved = Trainer(tiny_bert(), resume_args(str(tmp_path / "z")), train_dataset=cls_rows(21))
    with pytest.raises(ValueError, match="different data order .*num_examples: checkpoint 20 vs now 21"):
        moved.train(resume_from_checkpoint=str(Path(uninterrupted.args.output_dir) / "checkpoint-4"))
    wider = Trainer(tiny_bert(), resume_args(str(tmp_path / "w"), per_device_train_batch_size=4),
                    train_dataset=cls_rows(20))
    with pytest.raises(ValueError, match=r"global batch size of 9 \(per_device_train_batch_size 3 x "
                                         r"gradient_accumulation_steps 3 x 1 data-parallel ranks, world size 1\), but "
                                         r"this run's is 12 \(4 x 3 x 1, world size 1\)"):
        wider.train(resume_from_checkpoint=str(Path(uninterrupted.args.output_dir) / "checkpoint-4"))
    assert other.state.global_step == 0 and moved.state.global_step == 0 and wider.state.global_step == 0


def _early_stopped(output_dir, resume=None, callbacks=None):
    from loom.training import EarlyStoppingCallback, TrainingArguments

    # learning rate 0: the eval loss never improves after the first evaluation, so patience runs out at step 4
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, disable_tqdm=True, report_to="none",
                             max_steps=20, learning_rate=0.0, eval_strategy="steps", eval_steps=1, save_steps=1,
                             metric_for_best_model="loss", per_device_train_batch_size=4)
    callbacks = [EarlyStoppingCallback(early_stopping_patience=3)] if callbacks is None else callbacks
    trainer = Trainer(tiny_bert(), args, train_dataset=cls_rows(16), eval_dataset=cls_rows(4), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_early_stopping_patience_survives_resume(tmp_path):
    import transformers

    from loom.training import EarlyStoppingCallback

    full = _early_stopped(tmp_path)
    assert full.state.global_step == 4
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    reference = transformers.EarlyStoppingCallback(early_stopping_patience=3)
    reference.early_stopping_patience_counter = 1
    assert saved["EarlyStoppingCallback"] == reference.state()  # the reference's format, one miss so far
    assert set(saved["TrainerControl"]["args"]) == set(transformers.TrainerControl().state()["args"])

    resumed = _early_stopped(tmp_path / "again", resume=str(checkpoint))
    assert resumed.state.global_step == 4  # a fresh patience counter would run to step 5
    with pytest.raises(ValueError, match=r"state of 1 EarlyStoppingCallback callback\(s\) but this run has 2"):
        _early_stopped(tmp_path / "two", resume=str(checkpoint),
                       callbacks=[EarlyStoppingCallback(3), EarlyStoppingCallback(5)])


# a schedule that does not depend on the run's length, so a shorter run's steps are the first steps of a longer one
_SHORT_THEN_LONG = [({"max_steps": 4}, {"max_steps": 8}),
                    ({"max_steps": -1, "num_train_epochs": 1, "save_strategy": "epoch"},
                     {"max_steps": -1, "num_train_epochs": 2, "save_strategy": "epoch"})]


@pytest.mark.parametrize("short, long", _SHORT_THEN_LONG, ids=["max_steps", "num_train_epochs"])
def test_finished_run_resumes_to_the_new_length(tmp_path, short, long):
    """A finished run resumed with a larger max_steps / num_train_epochs trains on to the new end and equals one
    uninterrupted run to that end, bit for bit; resumed with its own length it trains and writes nothing."""
    def run(output_dir, lengths, resume=None):
        args = resume_args(str(output_dir), lr_scheduler_type="constant_with_warmup", **lengths)
        trainer = Trainer(tiny_bert(hidden_dropout_prob=0.1), args, train_dataset=cls_rows(20))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", long)
    first = run(tmp_path / "ext", short)
    done = [p.name for p in list_checkpoints(tmp_path / "ext")]
    again = run(tmp_path / "ext", short, resume=True)
    assert again.state.global_step == first.state.global_step and _losses(again) == _losses(first)
    assert [p.name for p in list_checkpoints(tmp_path / "ext")] == done
    with pytest.warns(UserWarning, match=rf"at step {first.state.global_step}, past max_steps=2 .*nothing to train"):
        assert run(tmp_path / "ext", {"max_steps": 2}, resume=True).state.global_step == first.state.global_step
    extended = run(tmp_path / "ext", long, resume=True)
    assert extended.state.global_step == full.state.global_step > first.state.global_step
    assert _losses(extended) == _losses(full)
    for (name, a), b in zip(full.model.state_dict().items(), extended.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert latest_checkpoint(tmp_path / "ext").name == f"checkpoint-{full.state.global_step}"
