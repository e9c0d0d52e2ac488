"""Hyperparameter search over Trainer runs with optuna (an optional dependency, imported here only)."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple


class BestRun(NamedTuple):
    run_id: str
    objective: float
    hyperparameters: dict[str, Any]
    run_summary: Any = None


def default_hp_space(trial) -> dict[str, Any]:
    """The reference's default optuna space: learning rate, epochs, seed, batch size."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 5),
        "seed": trial.suggest_int("seed", 1, 40),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8, 16, 32, 64]),
    }


def default_compute_objective(metrics: dict[str, float]) -> float:
    """eval_loss when it is the only metric, else the sum of the other evaluation metrics (the reference's rule)."""
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    loss = metrics.pop("eval_loss", None)
    others = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second")) and k != "epoch"}
    return sum(others.values()) if others else loss


def run_hyperparameter_search(trainer, hp_space: Callable | None, compute_objective: Callable | None, n_trials: int,
                              direction: str, backend: str, hp_name: Callable | None, **kwargs) -> BestRun:
    if backend != "optuna":
        raise ValueError(f"hyperparameter_search backend={backend!r} is not supported; loom supports 'optuna'")
    if trainer.model_init is None:
        raise ValueError("hyperparameter_search needs Trainer(model_init=...) so every trial starts from a fresh model")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    from loom.utils import require

    optuna = require("optuna", "Trainer.hyperparameter_search(backend='optuna')")
    hp_space = hp_space or default_hp_space
    compute_objective = compute_objective or default_compute_objective
    base_args = trainer.args

    def objective(trial) -> float:
        params = hp_space(trial)
        unknown = [k for k in params if not hasattr(base_args, k)]
        if unknown:
            raise ValueError(f"hp_space returned {unknown}, which are not TrainingArguments fields")
        name = hp_name(trial) if hp_name else f"run-{trial.number}"
        trainer.args = base_args.replace(**params, output_dir=f"{base_args.output_dir or 'trainer_output'}/{name}")
        trainer.train(trial=trial)
        trainer.state.trial_name, trainer.state.trial_params = name, params
        return compute_objective(trainer.evaluate())

    study = optuna.create_study(direction=direction, **{k: v for k, v in kwargs.items() if k in ("sampler", "pruner",
                                                                                                  "study_name")})
    try:
        study.optimize(objective, n_trials=n_trials, timeout=kwargs.get("timeout"))
    finally:
        trainer.args = base_args
    best = study.best_trial
    return BestRun(str(best.number), best.value, best.params, study)
