"""Sentence embeddings as a sentence-transformers folder configures them: modules.json, the Pooling module's
config (both the old `pooling_mode_*_tokens` booleans and 6.x's `"pooling_mode": "mean"`), Normalize,
Dense projections, `sentence_bert_config.json`'s `max_seq_length` and the prompts of
`config_sentence_transformers.json`. Older folders keep the encoder in a subfolder (`0_Transformer/`, named by
modules.json's Transformer entry): `transformer_folder` finds it, and the settings are read from the folder above."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
# sentence-transformers 6.x spells one mode differently; both spellings are accepted
_ALIASES = {"mean_sqrt_len_tokens": "mean_sqrt_len"}
# the older boolean keys, in the order sentence-transformers concatenates the vectors when several are on
_LEGACY_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# the modules loom runs, by the last part of their class path (old `sentence_transformers.models.Pooling` and 6.x
# `sentence_transformers.sentence_transformer.modules.pooling.Pooling` alike)
_RUNNABLE = ("Transformer", "Pooling", "Dense", "Normalize")
# Dense activations by class name (sentence-transformers saves e.g. "torch.nn.modules.activation.Tanh")
_ACTIVATIONS = {"Tanh": torch.tanh, "Identity": lambda x: x, "ReLU": torch.relu, "Sigmoid": torch.sigmoid,
                "GELU": torch.nn.functional.gelu, "SiLU": torch.nn.functional.silu}


@dataclass(frozen=True, eq=False)
class Dense:
    """sentence-transformers' Dense module: activation(pooled @ weight.T + bias)."""

    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None
    activation: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.device)
        return _ACTIVATIONS[self.activation](torch.nn.functional.linear(x, self.weight.to(x.device), bias))


@dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers folder says about turning token embeddings into one vector per text."""

    modes: tuple[str, ...] = ("mean",)
    steps: tuple = ()  # after pooling, in the folder's order: Dense modules and "normalize"
    include_prompt: bool = True
    max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def normalize(self) -> bool:
        return "normalize" in self.steps

    def prompt_text(self, prompt_name: str | None, prompt: str | None) -> str | None:
        """The text put before each input: `prompt` as given, else the named (or the folder's default) prompt."""
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return None
        if name not in self.prompts:
            known = sorted(self.prompts) or "none (config_sentence_transformers.json defines no prompts)"
            raise ValueError(f"prompt_name={name!r} is not one of the model's prompts: {known}; pass one of those, "
                             "or the text itself as prompt=")
        return self.prompts[name] or None


def normalize_mode(mode: str) -> str:
    mode = _ALIASES.get(mode, mode)
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling={mode!r} is not supported; use 'auto' or one of {POOLING_MODES}")
    return mode


def _local_modules(folder: Path) -> list | None:
    path = folder / "modules.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _transformer_path(modules: list) -> str:
    return next((m.get("path", "") for m in modules if m.get("type", "").endswith("Transformer")), "")


def transformer_folder(source) -> str | None:
    """The encoder's subfolder of an older sentence-transformers folder (modules.json names it, e.g.
    `0_Transformer`, and the root has no config.json); None for any other model directory or id."""
    folder = Path(source)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    modules = _local_modules(folder)
    sub = _transformer_path(modules) if isinstance(modules, list) else ""
    if not sub:
        return None
    if not (folder / sub).resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{folder / 'modules.json'}: the Transformer module's path {sub!r} leaves the model folder")
    return str(folder / sub)


def _sentence_root(source: str) -> tuple[str, str]:
    """(folder holding modules.json, the encoder's subfolder in it or ''): a model loaded from the `0_Transformer/`
    subfolder of an older layout reads its sentence-transformers settings from the folder above."""
    folder = Path(source)
    if folder.is_dir() and not (folder / "modules.json").is_file():
        modules = _local_modules(folder.parent)
        if isinstance(modules, list) and _transformer_path(modules) == folder.name:
            return str(folder.parent), folder.name
    return source, ""


def sentence_config_from_files(source: str | None) -> SentenceConfig:
    """The SentenceConfig of a model directory or id; the sentence-transformers defaults (mean pooling, no
    normalisation) when it ships no modules.json."""
    if source is None:
        return SentenceConfig()
    from loom.hub import resolve_file

    source, encoder_folder = _sentence_root(str(source))

    def read(name: str) -> tuple[dict | list | None, object]:
        try:
            path = resolve_file(source, name, required=False)
        except OSError:
            return None, None
        return (None, None) if path is None else (json.loads(path.read_text(encoding="utf-8")), path)

    modules, modules_path = read("modules.json")
    if modules is None:
        return SentenceConfig()
    settings: dict = {}
    steps: list = []
    for module in modules:
        kind = module.get("type", "")
        short = kind.rsplit(".", 1)[-1]
        if short not in _RUNNABLE:
            raise ValueError(f"{modules_path}: module {module.get('idx', '?')} is {kind!r} (folder "
                             f"{module.get('path', '')!r}), which loom does not run (it runs {', '.join(_RUNNABLE)}); "
                             "its embeddings would differ from sentence-transformers'. Use sentence-transformers "
                             "for this model, or pass pooling='mean' (or another mode) to pool the encoder's "
                             "outputs without that module")
        if short == "Pooling":
            config, config_path = read(f"{module.get('path', '')}/config.json".lstrip("/"))
            if config is not None:
                settings["modes"] = _modes(config, config_path)
                settings["include_prompt"] = bool(config.get("include_prompt", True))
        elif short == "Dense":
            steps.append(_dense(source, module, modules_path))
        elif short == "Normalize":
            steps.append("normalize")
    settings["steps"] = tuple(steps)
    bert_config, _ = read("sentence_bert_config.json")
    if bert_config is None and encoder_folder:  # the older layout keeps it beside the encoder
        bert_config, _ = read(f"{encoder_folder}/sentence_bert_config.json")
    if isinstance((bert_config or {}).get("max_seq_length"), int):
        settings["max_seq_length"] = bert_config["max_seq_length"]
    st_config, _ = read("config_sentence_transformers.json")
    if st_config:
        settings["prompts"] = dict(st_config.get("prompts") or {})
        settings["default_prompt_name"] = st_config.get("default_prompt_name")
    return SentenceConfig(**settings)


def _dense(source: str, module: dict, modules_path) -> Dense:
    from loom.hub import resolve_file

    folder = module.get("path", "")
    config_path = resolve_file(source, f"{folder}/config.json".lstrip("/"), required=False)
    if config_path is None:
        raise ValueError(f"{modules_path}: the Dense module's folder {folder!r} has no config.json; the folder is "
                         "incomplete, copy it again from where the model was saved")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS or config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ValueError(f"{config_path}: loom runs Dense modules on the sentence embedding with one of the "
                         f"activations {sorted(_ACTIVATIONS)}; this one has activation_function="
                         f"{config.get('activation_function')!r}, module_input_name="
                         f"{config.get('module_input_name', 'sentence_embedding')!r}. Use sentence-transformers "
                         "for this model")
    weights = _module_weights(source, folder, modules_path)
    return Dense(weights["linear.weight"].float(), weights.get("linear.bias"), activation)


def _module_weights(source: str, folder: str, modules_path) -> dict[str, torch.Tensor]:
    from loom.hub import resolve_file

    path = resolve_file(source, f"{folder}/model.safetensors".lstrip("/"), required=False)
    if path is not None:
        from safetensors.torch import load_file

        weights = load_file(str(path))
    else:
        path = resolve_file(source, f"{folder}/pytorch_model.bin".lstrip("/"), required=False)
        if path is None:
            raise ValueError(f"{modules_path}: the Dense module's folder {folder!r} has neither model.safetensors nor "
                             "pytorch_model.bin; copy the folder again from where the model was saved")
        weights = torch.load(str(path), map_location="cpu", weights_only=True)
    if "linear.weight" not in weights:
        raise ValueError(f"{path}: no 'linear.weight' tensor (found {sorted(weights)}); this is not a "
                         "sentence-transformers Dense module's weights file")
    return {key: value.float() for key, value in weights.items()}


def _modes(config: dict, path) -> tuple[str, ...]:
    if "pooling_mode" in config:
        value = config["pooling_mode"]
        modes = [value] if isinstance(value, str) else list(value)
    else:
        # none switched on means mean pooling, as sentence-transformers reads it
        modes = [mode for key, mode in _LEGACY_FLAGS.items() if config.get(key)] or ["mean"]
    try:
        return tuple(normalize_mode(mode) for mode in modes)
    except ValueError:
        raise ValueError(f"{path}: pooling mode {modes} is not one loom runs; it runs {POOLING_MODES}") from None


def pool(hidden: torch.Tensor, modes: str | tuple[str, ...], start: int = 0) -> torch.Tensor:
    """One vector from the (T, H) hidden states of one unpadded input; several modes are concatenated in order.
    Tokens before `start` (a prompt left out of pooling) are skipped; weighted mean keeps the tokens' positions as
    their weights, as sentence-transformers does."""
    hidden = hidden.float()
    kept = hidden[start:] if start < hidden.shape[0] else hidden[-1:]
    first = hidden.shape[0] - kept.shape[0]
    vectors = []
    for mode in (modes,) if isinstance(modes, str) else modes:
        mode = normalize_mode(mode)
        if mode == "mean":
            vectors.append(kept.mean(0))
        elif mode == "cls":
            vectors.append(kept[0])
        elif mode == "max":
            vectors.append(kept.max(0).values)
        elif mode == "mean_sqrt_len":
            vectors.append(kept.sum(0) / kept.shape[0] ** 0.5)
        elif mode == "weightedmean":
            weights = torch.arange(first + 1, first + kept.shape[0] + 1, dtype=kept.dtype)[:, None]  # (T, 1)
            vectors.append((kept * weights).sum(0) / weights.sum())
        else:  # lasttoken
            vectors.append(kept[-1])
    return vectors[0] if len(vectors) == 1 else torch.cat(vectors)
