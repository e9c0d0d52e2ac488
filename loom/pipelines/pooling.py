"""Sentence-embedding pooling as sentence-transformers configures it (modules.json + 1_Pooling/config.json)."""
from __future__ import annotations

import json

import torch

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


def pooling_from_files(source: str | None) -> tuple[str, bool]:
    """(pooling mode, normalize) of a sentence-transformers model directory or id; ("mean", False) when the model
    ships no pooling config (mean pooling is the sentence-transformers default)."""
    if source is None:
        return "mean", False
    from loom.hub import resolve_file

    try:
        modules_file = resolve_file(source, "modules.json", required=False)
    except OSError:
        return "mean", False
    if modules_file is None:
        return "mean", False
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    mode, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            config_file = resolve_file(source, f"{module.get('path', '')}/config.json".lstrip("/"), required=False)
            if config_file is not None:
                mode = _mode(json.loads(config_file.read_text(encoding="utf-8")), config_file)
        elif kind.endswith("Normalize"):
            normalize = True
    return mode, normalize


def _mode(config: dict, path) -> str:
    flags = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
    on = [mode for key, mode in flags.items() if config.get(key)]
    if len(on) != 1:
        raise ValueError(f"{path}: loom supports exactly one pooling mode per model, found {on or 'none'}; pass "
                         f"pooling= one of {POOLING_MODES}")
    return on[0]


def pool(hidden: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector from the (T, H) hidden states of one unpadded input."""
    hidden = hidden.float()
    if mode == "mean":
        return hidden.mean(0)
    if mode == "cls":
        return hidden[0]
    if mode == "max":
        return hidden.max(0).values
    if mode == "mean_sqrt_len":
        return hidden.sum(0) / hidden.shape[0] ** 0.5
    raise ValueError(f"pooling={mode!r} is not supported; use one of {POOLING_MODES}")
