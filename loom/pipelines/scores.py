"""Score functions shared by the classification-style pipelines."""
from __future__ import annotations

import numpy as np

FUNCTIONS = ("softmax", "sigmoid", "none")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def check_function(name) -> str | None:
    """Normalise a `function_to_apply` argument ("softmax", "SIGMOID", ...); None means the model's default."""
    if name is None or (isinstance(name, str) and name.lower() == "default"):
        return None
    value = getattr(name, "value", name)  # enum-like values from ported code
    if not isinstance(value, str) or value.lower() not in FUNCTIONS:
        raise ValueError(f"function_to_apply={name!r} is not supported; use one of {FUNCTIONS} or 'default'")
    return value.lower()


def default_function(config) -> str:
    """The reference's rule: none for regression, sigmoid for multi-label or one label, else softmax."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def apply_function(logits: np.ndarray, function: str) -> np.ndarray:
    if function == "softmax":
        return softmax(logits)
    if function == "sigmoid":
        return sigmoid(logits)
    return logits


def label_scores(scores: np.ndarray, id2label: dict, top_k: int | None) -> list[dict]:
    """[{"label", "score"}] sorted by score, best first, cut to top_k (None keeps all)."""
    ranked = sorted(({"label": id2label[i], "score": float(s)} for i, s in enumerate(scores)),
                    key=lambda d: d["score"], reverse=True)
    return ranked if top_k is None else ranked[:top_k]


def check_top_k(top_k, name: str = "top_k") -> None:
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {top_k!r}")
