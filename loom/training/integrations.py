"""Experiment trackers as Trainer callbacks: Weights & Biases, MLflow and Trackio, through their own packages.

`report_to` picks them by the reference's names ("wandb", "mlflow", "trackio"; "all" = every installed one). Each
tracker package is optional: it is imported when its callback is built, which the Trainer does in its constructor,
so a missing package stops the run before any training. Each callback logs the run's parameters (the model config
and the TrainingArguments) when training begins, every log dict with the reference's key names (`train/loss`,
`eval/loss`, ...), and finishes the run when training ends. The trackers' own environment variables (WANDB_MODE,
MLFLOW_TRACKING_URI, TRACKIO_DIR, ...) are read by the trackers themselves; the ones the reference's integration adds
are read here and listed on each class.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

from loom.training.callbacks import JsonLinesLoggerCallback, TensorBoardCallback, TrainerCallback

_TRUE = {"1", "true", "yes", "on", "y"}
# logged once per run as summary values, not as a per-step series (the reference's list)
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in _TRUE


def rewrite_logs(logs: dict) -> dict:
    """The reference's tracker keys: eval_x -> eval/x, test_x -> test/x, anything else -> train/x."""
    out = {}
    for key, value in logs.items():
        for prefix in ("eval", "test"):
            if key.startswith(prefix + "_"):
                out[f"{prefix}/{key[len(prefix) + 1:]}"] = value
                break
        else:
            out[f"train/{key}"] = value
    return out


def run_parameters(args, model) -> dict:
    """What a tracker records as the run's parameters: the model config overlaid with the TrainingArguments."""
    params = {}
    config = getattr(model, "config", None)
    if config is not None:
        params.update(config if isinstance(config, dict) else config.to_dict())
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        params["peft_config"] = {k: getattr(v, "to_dict", lambda v=v: v)() for k, v in peft_config.items()}
    params.update(args.to_dict())
    return params


class _TrackerCallback(TrainerCallback):
    """Shared life cycle: import the package when built, start the run on train begin (or the first log), log on
    the main process only, finish on train end. Subclasses fill in _start, _log and _finish."""

    report_to = ""  # the report_to value that selects this callback (INTEGRATION_TO_CALLBACK names its package)

    def __init__(self) -> None:
        self._tracker = import_tracker(self.report_to)
        self._initialized = False

    def setup(self, args, state, model) -> None:
        if state.is_world_process_zero:
            self._start(args, state, model)
        self._initialized = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs:
            return
        if not self._initialized:
            self.setup(args, state, model)
        if state.is_world_process_zero:
            self._log(logs, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self._initialized and state.is_world_process_zero:
            self._finish(args, state, **kwargs)
        self._initialized = False

    def _start(self, args, state, model) -> None:
        raise NotImplementedError

    def _log(self, logs: dict, state) -> None:
        raise NotImplementedError

    def _finish(self, args, state, **kwargs) -> None:
        raise NotImplementedError


class WandbCallback(_TrackerCallback):
    """Logs to Weights & Biases (`pip install wandb`). `WANDB_MODE=offline` keeps the run on disk (under WANDB_DIR)
    for a later `wandb sync`.

    Environment, as the reference: WANDB_PROJECT (default "huggingface"); WANDB_LOG_MODEL = "end" (the trained model
    as an artifact when training ends), "checkpoint" (every saved checkpoint) or "false"; WANDB_WATCH = "gradients",
    "parameters" or "all" to let wandb watch the model. The run is named `args.run_name`.
    """

    report_to = "wandb"

    def __init__(self) -> None:
        super().__init__()
        self._log_model = os.environ.get("WANDB_LOG_MODEL", "false").strip().lower()
        if self._log_model in ("", "0", "no", "off"):
            self._log_model = "false"
        if self._log_model not in ("end", "checkpoint", "false"):
            raise ValueError(f"WANDB_LOG_MODEL={self._log_model!r} is not understood; set it to 'end', 'checkpoint' "
                             "or 'false'")

    def _start(self, args, state, model) -> None:
        wandb = self._tracker
        init_args = {}
        if state.trial_name is not None:
            init_args = {"name": state.trial_name, "group": args.run_name or args.output_dir}
        elif args.run_name is not None:
            init_args["name"] = args.run_name
        if wandb.run is None:
            wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), **init_args)
        wandb.config.update(run_parameters(args, model), allow_val_change=True)
        if hasattr(model, "num_parameters"):
            wandb.config["model/num_parameters"] = model.num_parameters()
        wandb.define_metric("train/global_step")
        wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
        watch = os.environ.get("WANDB_WATCH", "false")
        if watch in ("gradients", "parameters", "all"):
            wandb.watch(model, log=watch, log_freq=max(100, state.logging_steps))

    def _log(self, logs: dict, state) -> None:
        run = self._tracker.run
        for key in SUMMARY_KEYS:
            if key in logs:
                run.summary[key] = logs[key]
        series = rewrite_logs({k: v for k, v in logs.items() if k not in SUMMARY_KEYS})
        if series:
            run.log({**series, "train/global_step": state.global_step})

    def on_save(self, args, state, control, **kwargs):
        if self._log_model == "checkpoint" and self._initialized and state.is_world_process_zero:
            folder = Path(args.output_dir or "trainer_output") / f"checkpoint-{state.global_step}"
            self._log_artifact(folder, args, [f"epoch_{round(state.epoch or 0, 2)}",
                                              f"checkpoint_global_step_{state.global_step}"])

    def _finish(self, args, state, model=None, processing_class=None, **kwargs) -> None:
        if self._log_model == "end" and model is not None:
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                    processing_class.save_pretrained(folder)
                self._log_artifact(Path(folder), args, ["final_model"])
        self._tracker.finish()

    def _log_artifact(self, folder: Path, args, aliases: list[str]) -> None:
        run = self._tracker.run
        named = args.run_name is not None and args.run_name != args.output_dir
        metadata = {k: v for k, v in dict(run.summary).items() if isinstance(v, (int, float)) and not k.startswith("_")}
        artifact = self._tracker.Artifact(name=f"model-{run.name if named else run.id}", type="model",
                                          metadata=metadata)
        artifact.add_dir(str(folder))
        run.log_artifact(artifact, aliases=aliases)


class MLflowCallback(_TrackerCallback):
    """Logs to MLflow (`pip install mlflow-skinny` or `mlflow`); where runs go is MLflow's tracking URI
    (MLFLOW_TRACKING_URI or `mlflow.set_tracking_uri`).

    Environment, as the reference: MLFLOW_EXPERIMENT_NAME (created if missing), MLFLOW_RUN_ID (resume that run),
    MLFLOW_NESTED_RUN, MLFLOW_TAGS (a JSON dict), MLFLOW_FLATTEN_PARAMS, MLFLOW_MAX_LOG_PARAMS,
    HF_MLFLOW_LOG_ARTIFACTS (copy every saved checkpoint folder into the run's artifacts), and
    DISABLE_MLFLOW_INTEGRATION (leaves mlflow out of report_to="all"). The run is named `args.run_name`.
    """

    report_to = "mlflow"

    def __init__(self) -> None:
        super().__init__()
        self._auto_end_run = False
        self._log_artifacts = _env_flag("HF_MLFLOW_LOG_ARTIFACTS")
        max_params = os.environ.get("MLFLOW_MAX_LOG_PARAMS")
        if max_params is not None and not max_params.isdigit():
            raise ValueError(f"MLFLOW_MAX_LOG_PARAMS={max_params!r} must be a whole number of parameters")
        self._max_params = int(max_params) if max_params is not None else None

    def _start(self, args, state, model) -> None:
        mlflow = self._tracker
        nested = _env_flag("MLFLOW_NESTED_RUN")
        if mlflow.active_run() is None or nested or os.environ.get("MLFLOW_RUN_ID"):
            if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
                mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
            mlflow.start_run(run_name=args.run_name, nested=nested)
            self._auto_end_run = True
        self._log_params(run_parameters(args, model))
        if os.environ.get("MLFLOW_TAGS"):
            mlflow.set_tags(json.loads(os.environ["MLFLOW_TAGS"]))

    def _log_params(self, params: dict) -> None:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        if _env_flag("MLFLOW_FLATTEN_PARAMS"):
            params = _flatten(params)
        too_long = sorted(k for k, v in params.items() if len(str(v)) > MAX_PARAM_VAL_LENGTH)
        if too_long:
            warnings.warn(f"MLflow keeps parameter values up to {MAX_PARAM_VAL_LENGTH} characters; not logging "
                          f"{too_long} (set MLFLOW_FLATTEN_PARAMS=true to log nested values one by one)", stacklevel=3)
        items = [(k, v) for k, v in params.items() if k not in too_long][:self._max_params]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._tracker.log_params(dict(items[i:i + MAX_PARAMS_TAGS_PER_BATCH]), synchronous=False)

    def _log(self, logs: dict, state) -> None:
        metrics = {re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k): float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._tracker.log_metrics(metrics, step=state.global_step, synchronous=False)

    def on_save(self, args, state, control, **kwargs):
        if self._log_artifacts and self._initialized and state.is_world_process_zero:
            name = f"checkpoint-{state.global_step}"
            self._tracker.log_artifacts(str(Path(args.output_dir or "trainer_output") / name), artifact_path=name)

    def _finish(self, args, state, **kwargs) -> None:
        if self._auto_end_run and self._tracker.active_run() is not None:
            self._tracker.end_run()
        self._auto_end_run = False


def _flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TrackioCallback(_TrackerCallback):
    """Logs to Trackio (`pip install trackio`): a local SQLite store under TRACKIO_DIR, or a Hugging Face Space when
    `args.trackio_space_id` is set. The project is `args.project` (default "huggingface"), the run `args.run_name`;
    `trackio_bucket_id` and `hub_private_repo` pass through to `trackio.init`."""

    report_to = "trackio"

    def _start(self, args, state, model) -> None:
        trackio = self._tracker
        trackio.init(project=getattr(args, "project", "huggingface"), name=args.run_name, resume="allow",
                     space_id=getattr(args, "trackio_space_id", None), private=getattr(args, "hub_private_repo", None),
                     bucket_id=getattr(args, "trackio_bucket_id", None), config=run_parameters(args, model))
        if hasattr(model, "num_parameters"):
            trackio.config["model/num_parameters"] = model.num_parameters()

    def _log(self, logs: dict, state) -> None:
        series = rewrite_logs({k: v for k, v in logs.items() if k not in SUMMARY_KEYS})
        if series:
            self._tracker.log({**series, "train/global_step": state.global_step})

    def _finish(self, args, state, **kwargs) -> None:
        self._tracker.finish()


# report_to value -> (callback class, module that must be importable; None: always available)
INTEGRATION_TO_CALLBACK = {
    "jsonl": (JsonLinesLoggerCallback, None),
    "tensorboard": (TensorBoardCallback, "tensorboard"),
    "mlflow": (MLflowCallback, "mlflow"),
    "trackio": (TrackioCallback, "trackio"),
    "wandb": (WandbCallback, "wandb"),
}
_PIP_NAMES = {"mlflow": "mlflow-skinny"}


def import_tracker(name: str):
    """The tracker package of report_to value `name`, or an ImportError naming the package and the report_to value."""
    package = INTEGRATION_TO_CALLBACK[name][1]
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"report_to={name!r} needs the package '{package}', which is not installed ({e}); install "
                          f"it with `pip install {_PIP_NAMES.get(package, package)}` or remove {name!r} from "
                          "report_to") from None


def available_integrations() -> list[str]:
    """The report_to values whose package is installed (what report_to="all" means)."""
    names = []
    for name, (_, package) in INTEGRATION_TO_CALLBACK.items():
        if name == "mlflow" and _env_flag("DISABLE_MLFLOW_INTEGRATION"):
            continue
        if package is None or importlib.util.find_spec(package) is not None:
            names.append(name)
    return names


def normalise_report_to(value) -> list[str]:
    """report_to as a list of names: None/"none" -> [], "all" -> the installed ones; unknown names are an error."""
    if value is None or value == "none" or value == ["none"]:
        return []
    if value == "all" or value == ["all"]:
        return available_integrations()
    names = [value] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ValueError(f"report_to={unknown} is not supported by loom; use 'none', 'all' or some of "
                         f"{tuple(INTEGRATION_TO_CALLBACK)}")
    return names


def reporting_callbacks(report_to: list[str]) -> list[TrainerCallback]:
    """One callback per report_to name, built now, so a missing tracker package fails before training."""
    return [INTEGRATION_TO_CALLBACK[name][0]() for name in report_to]
