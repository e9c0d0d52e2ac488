"""Experiment trackers driven for real (wandb offline, MLflow's local file store, Trackio's local SQLite store): a
short training run through each callback, then the run is read back from the tracker's own files or API."""
from __future__ import annotations

import json
import struct
import sys

import pytest

from loom.training import Trainer, TrainingArguments
from loom.training.integrations import rewrite_logs
from tests.training.conftest import cls_rows, tiny_bert


def _train(args_for, report_to, **kwargs):
    args = args_for(max_steps=3, report_to=report_to, run_name="tiny-run", eval_strategy="steps", eval_steps=3,
                    **kwargs)
    trainer = Trainer(tiny_bert(), args, train_dataset=cls_rows(12), eval_dataset=cls_rows(4))
    trainer.train()
    return trainer


def _logged(trainer, key: str) -> dict[int, float]:
    """step -> value of `key` in the Trainer's own log history (what every tracker must have received)."""
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def test_rewrite_logs_matches_the_reference():
    integration_utils = pytest.importorskip("transformers.integrations.integration_utils",
                                            reason="the reference is the oracle for the tracker key names")
    logs = {"loss": 1.0, "learning_rate": 0.1, "eval_loss": 2.0, "eval_accuracy": 0.5, "test_f1": 0.1, "epoch": 1.0,
            "evaluation": 3.0}
    assert rewrite_logs(logs) == integration_utils.rewrite_logs(logs)


# -- wandb --------------------------------------------------------------------------------------------------------
def read_wandb_records(path):
    """The records of a .wandb transaction log, decoded with wandb's own protobuf schema. The file is a 7-byte
    header then 32 KiB blocks of chunks (crc32c: 4 bytes, length: 2, type: 1 = full, 2 = first, 3 = middle,
    4 = last); wandb 0.31 reads it only from its Go core, so the framing is undone here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_run_log(args_for, tmp_path, monkeypatch, env: dict, **train_kwargs):
    """Train with report_to="wandb" offline into tmp_path; returns (trainer, the run's .wandb file)."""
    wandb = pytest.importorskip("wandb", reason="wandb is an optional dependency")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", **env}.items():
        monkeypatch.setenv(name, value)
    trainer = _train(args_for, "wandb", **train_kwargs)
    # wandb's service finishes writing the run's file when it shuts down (at process exit, or here); it also
    # reads WANDB_DIR once per service, so the next test gets a fresh one
    wandb.teardown()
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    return trainer, log


def _items(entries) -> dict:
    return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}


def test_wandb_offline_run_is_read_back(args_for, tmp_path, monkeypatch):
    trainer, log = _wandb_run_log(args_for, tmp_path, monkeypatch, {"WANDB_PROJECT": "loom-tests",
                                                                    "WANDB_LOG_MODEL": "end"})
    records = read_wandb_records(log)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[-1] == "exit", "the run was not finished"
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.display_name) == ("loom-tests", "tiny-run")
    config = {}
    for r in records:
        if r.HasField("config"):
            config.update(_items(r.config.update))
    assert config["learning_rate"] == trainer.args.learning_rate and config["hidden_size"] == 32
    assert config["model/num_parameters"] == trainer.model.num_parameters()
    history = [_items(r.history.item) for r in records if r.HasField("history")]
    assert {h["train/global_step"]: h["train/loss"] for h in history if "train/loss" in h} == _logged(trainer, "loss")
    assert {h["train/global_step"]: h["eval/loss"] for h in history if "eval/loss" in h} == _logged(trainer,
                                                                                                    "eval_loss")
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update(_items(r.summary.update))
    assert summary["train_loss"] == _logged(trainer, "train_loss")[3]
    (artifact,) = [r.artifact for r in records if r.HasField("artifact")]
    assert (artifact.name, artifact.type) == ("model-tiny-run", "model") and "final_model" in artifact.aliases
    assert {"config.json", "model.safetensors"} <= {entry.path for entry in artifact.manifest.contents}


def test_wandb_logs_each_checkpoint_when_asked(args_for, tmp_path, monkeypatch):
    _, log = _wandb_run_log(args_for, tmp_path, monkeypatch, {"WANDB_LOG_MODEL": "checkpoint"},
                            save_strategy="steps", save_steps=2)
    artifacts = [r.artifact for r in read_wandb_records(log) if r.HasField("artifact")]
    assert [[x for x in a.aliases if x.startswith("checkpoint_")] for a in artifacts] == [
        ["checkpoint_global_step_2"], ["checkpoint_global_step_3"]]
    assert {"optimizer.pt", "trainer_state.json", "model.safetensors"} <= {e.path for e in
                                                                           artifacts[0].manifest.contents}


def test_wandb_log_model_must_be_understood(args_for, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional dependency")
    monkeypatch.setenv("WANDB_LOG_MODEL", "always")
    with pytest.raises(ValueError, match="WANDB_LOG_MODEL='always' is not understood; set it to 'end', 'checkpoint'"):
        Trainer(tiny_bert(), args_for(report_to="wandb"), train_dataset=cls_rows(4))


# -- mlflow -------------------------------------------------------------------------------------------------------
def test_mlflow_file_store_run_is_read_back(args_for, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an optional dependency")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    for name, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true",
                        "MLFLOW_EXPERIMENT_NAME": "loom-exp", "HF_MLFLOW_LOG_ARTIFACTS": "1",
                        "MLFLOW_TAGS": json.dumps({"team": "loom"})}.items():
        monkeypatch.setenv(name, value)
    trainer = _train(args_for, "mlflow", save_strategy="steps", save_steps=2)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("loom-exp").experiment_id])
    assert (run.info.run_name, run.info.status, run.data.tags["team"]) == ("tiny-run", "FINISHED", "loom")
    assert run.data.params["learning_rate"] == str(trainer.args.learning_rate)
    assert run.data.params["hidden_size"] == "32"
    for key in ("loss", "eval_loss", "train_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert {m.step: m.value for m in history} == pytest.approx(_logged(trainer, key)), key
    saved = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint-2")}
    assert {"checkpoint-2/config.json", "checkpoint-2/model.safetensors"} <= saved


# -- trackio ------------------------------------------------------------------------------------------------------
def test_trackio_local_store_run_is_read_back(args_for, tmp_path_factory, monkeypatch):
    if "trackio" not in sys.modules:  # trackio fixes its directory when imported
        monkeypatch.setenv("TRACKIO_DIR", str(tmp_path_factory.mktemp("trackio")))
    trackio = pytest.importorskip("trackio", reason="trackio is an optional dependency")
    from trackio.utils import TRACKIO_DIR

    assert str(TRACKIO_DIR).startswith(str(tmp_path_factory.getbasetemp())), \
        f"trackio was imported before this test with its store at {TRACKIO_DIR}, outside the test's tmp dir"
    args = args_for(max_steps=3, report_to="trackio", run_name="tiny-run")
    args.project = "loom-tests"  # a TrainingArguments field in the reference; set either way
    trainer = Trainer(tiny_bert(), args, train_dataset=cls_rows(12))
    trainer.train()
    assert (TRACKIO_DIR / "loom-tests.db").is_file()
    (run,) = trackio.Api().runs("loom-tests")
    assert run.name == "tiny-run"
    assert run.config["learning_rate"] == trainer.args.learning_rate and run.config["hidden_size"] == 32
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("loom-tests", "tiny-run")
    assert {r["train/global_step"]: r["train/loss"] for r in logs if "train/loss" in r} == _logged(trainer, "loss")


# -- selection and missing packages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,package", [("wandb", "wandb"), ("mlflow", "mlflow"), ("trackio", "trackio")])
def test_missing_tracker_fails_at_trainer_construction(args_for, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail as if it were not installed
    args = args_for(report_to=[name])
    with pytest.raises(ImportError, match=f"report_to='{name}' needs the package '{package}', which is not "
                                          f"installed .*pip install .*or remove '{name}' from report_to"):
        Trainer(tiny_bert(), args, train_dataset=cls_rows(4))


def test_report_to_all_means_the_installed_trackers(monkeypatch):
    for package in ("wandb", "tensorboard"):
        monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    assert TrainingArguments(output_dir="x", report_to="all").report_to == ["jsonl", "trackio"]
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION")
    assert TrainingArguments(output_dir="x", report_to="all").report_to == ["jsonl", "mlflow", "trackio"]
    assert TrainingArguments(output_dir="x", report_to="mlflow").report_to == ["mlflow"]
    assert TrainingArguments(output_dir="x", report_to=["none"]).report_to == []
