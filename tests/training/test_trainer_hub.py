"""Trainer and the Hub: pushes per hub_strategy (the folders and commits huggingface_hub is asked to upload),
push_to_hub at the end, the model card (parsed by huggingface_hub, metadata as the reference builds it), and the
errors at construction when nothing could be pushed."""
from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import Future

import pytest

from loom.training import Trainer, TrainerCallback, TrainingArguments
from tests.training.conftest import cls_rows, tiny_bert


def _hub_args(tmp_path, **settings):
    """TrainingArguments with hub settings, whether or not this TrainingArguments declares them as fields yet."""
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    base = dict(output_dir=str(tmp_path / "out"), disable_tqdm=True, logging_steps=1, report_to="none",
                max_steps=4, save_steps=2, learning_rate=1e-2)
    args = TrainingArguments(**base, **{k: v for k, v in settings.items() if k in known})
    for name, value in settings.items():
        if name not in known:
            setattr(args, name, value)
    return args


def _trainer(args, **kwargs):
    return Trainer(tiny_bert(), args, train_dataset=cls_rows(16), **kwargs)


class PushCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_push_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_pushing_is_checked_before_training(fake_hub, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"TrainingArguments\(push_to_hub=True\): HF_HUB_OFFLINE is set, so "
                                           "nothing can be uploaded"):
        _trainer(_hub_args(tmp_path, push_to_hub=True, hub_token="hf_x"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match=r"TrainingArguments\(push_to_hub=True\): no Hugging Face token"):
        _trainer(_hub_args(tmp_path, push_to_hub=True))
    with pytest.raises(ValueError, match="hub_strategy='sometimes' is not supported; use one of end, every_save"):
        _trainer(_hub_args(tmp_path, push_to_hub=True, hub_token="hf_x", hub_strategy="sometimes"))
    assert fake_hub.calls == [] and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="Trainer.push_to_hub: no Hugging Face token"):
        _trainer(_hub_args(tmp_path)).push_to_hub()
    assert fake_hub.calls == []


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_hub_strategy_decides_what_each_save_pushes(fake_hub, tmp_path, strategy):
    args = _hub_args(tmp_path, push_to_hub=True, hub_token="hf_x", hub_model_id="org/tiny", hub_strategy=strategy,
                     hub_revision="dev")
    counter = PushCounter()
    trainer = _trainer(args, callbacks=[counter])
    assert fake_hub.calls == [("create_repo", "org/tiny", {"private": None, "exist_ok": True, "token": "hf_x"})]
    trainer.train()
    assert counter.steps == ([] if strategy == "end" else [2, 4])
    out = tmp_path / "out"
    pushed = [(c["message"], c.get("path_in_repo"), c["revision"]) for c in fake_hub.commits]
    if strategy == "end":
        assert pushed == []
    else:
        steps = [f"Training in progress, step {s}" for s in (2, 4)]
        folder = {"every_save": None, "checkpoint": "last-checkpoint", "all_checkpoints": "checkpoint-{}"}[strategy]
        expected = []
        for step, message in zip((2, 4), steps):
            expected.append((message, None, "dev"))
            if folder is not None:
                expected.append((f"{message}, checkpoint", folder.format(step), "dev"))
        assert pushed == expected
        model_push = fake_hub.commits[-2 if folder else -1]
        assert set(model_push["files"]) == {"config.json", "model.safetensors", "training_args.json"}
        assert model_push["files"]["model.safetensors"] == (out / "checkpoint-4" / "model.safetensors").read_bytes()
        if folder is not None:
            prefix = folder.format(4)
            assert {f"{prefix}/{name}" for name in os.listdir(out / "checkpoint-4")} == \
                set(fake_hub.commits[-1]["files"])
    fake_hub.commits.clear()
    trainer.push_to_hub(finetuned_from="org/base", dataset_tags="glue")
    (final,) = fake_hub.commits
    assert counter.steps[-1] == 4
    assert (final["message"], final["revision"], final["repo_id"]) == ("End of training", "dev", "org/tiny")
    assert {"README.md", "config.json", "model.safetensors"} <= set(final["files"])
    assert not [f for f in final["files"] if f.startswith("checkpoint-")]


def test_save_model_pushes_when_asked(fake_hub, tmp_path):
    trainer = _trainer(_hub_args(tmp_path, push_to_hub=True, hub_token="hf_x", hub_strategy="end",
                                 save_strategy="no"))
    trainer.train()
    assert fake_hub.commits == []
    trainer.save_model()
    (commit,) = fake_hub.commits
    assert commit["message"] == "Model save" and commit["repo_id"] == "me/out"  # default repo: output_dir's name
    assert commit["token"] == "hf_x"


def test_model_card_metadata_is_the_references(tmp_path):
    from huggingface_hub import ModelCard

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = _hub_args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="no")
    trainer = _trainer(args, eval_dataset=cls_rows(8), compute_metrics=accuracy)
    trainer.train()
    card_args = dict(finetuned_from="org/base-bert", dataset_tags="glue", dataset="GLUE SST-2", dataset_args="sst2",
                     license="apache-2.0", language="en", tags=["demo"])
    trainer.create_model_card(**card_args)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["base_model"] == "org/base-bert"
    assert meta["tags"] == ["demo", "generated_from_trainer"] and meta["datasets"] == ["glue"]
    (result,) = meta["model-index"][0]["results"]
    last_eval = [h for h in trainer.state.log_history if "eval_accuracy" in h][-1]
    assert result["task"]["type"] == "text-classification"
    assert result["metrics"] == [{"name": "Accuracy", "type": "accuracy", "value": last_eval["eval_accuracy"]}]
    assert "| Training Loss | Epoch | Step | Accuracy | Validation Loss |" in card.text

    modelcard = pytest.importorskip("transformers.modelcard", reason="the reference is the oracle for the card")
    from loom.training.model_card import parse_log_history

    _, ref_rows, ref_results = modelcard.parse_log_history(trainer.state.log_history)
    assert parse_log_history(trainer.state.log_history) == (ref_rows, ref_results)
    summary = modelcard.TrainingSummary(model_name="out", tags=["demo", "generated_from_trainer"],
                                        tasks="text-classification", eval_results=ref_results,
                                        **{k: v for k, v in card_args.items() if k != "tags"})
    assert meta == json.loads(json.dumps(summary.create_metadata()))


def test_model_card_infers_base_model_and_keeps_tags(tmp_path):
    from huggingface_hub import ModelCard

    trainer = _trainer(_hub_args(tmp_path, save_strategy="no"))
    readme = tmp_path / "out" / "README.md"
    trainer.model.config._name_or_path = "org/pretrained"
    trainer.create_model_card(tags="first")
    assert ModelCard.load(readme).data.base_model == "org/pretrained"
    trainer.model.config._name_or_path = str(tmp_path)  # a local directory is no hub model to name
    trainer.create_model_card(tags=["second"])
    text = readme.read_text()
    data = ModelCard(text).data
    assert data.base_model is None and data.tags == ["second", "first", "generated_from_trainer"]
    assert "This model was trained from scratch on an unknown dataset." in text
    assert data.to_dict()["model-index"] == [{"name": "out", "results": []}]


def test_a_failed_background_push_is_raised_when_training_ends(fake_hub, tmp_path, monkeypatch):
    import huggingface_hub

    def failing_upload(self, **kwargs):
        job = Future()
        job.set_exception(OSError("503 Service Unavailable"))
        return job

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", failing_upload)
    trainer = _trainer(_hub_args(tmp_path, push_to_hub=True, hub_token="hf_x"))
    with pytest.raises(OSError, match="503 Service Unavailable"):
        trainer.train()
    assert (tmp_path / "out" / "checkpoint-4" / "model.safetensors").is_file()  # the work is saved all the same


@pytest.mark.parametrize("always", [False, True])
def test_a_running_push_is_not_doubled_unless_hub_always_push(fake_hub, tmp_path, monkeypatch, always):
    import huggingface_hub

    pending = []

    def slow_upload(self, **kwargs):
        pending.append(Future())  # still running when the next checkpoint is saved
        return pending[-1]

    class FinishUploads(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            for job in pending:
                job.set_result(None)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", slow_upload)
    trainer = _trainer(_hub_args(tmp_path, push_to_hub=True, hub_token="hf_x", hub_always_push=always),
                       callbacks=[FinishUploads()])
    trainer.train()
    assert len(pending) == (2 if always else 1)
