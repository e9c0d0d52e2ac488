"""One table from model_type to its config class and its model class per head, gathered from the model files\n(each declares `MODEL_TYPES`, so adding a family touches only its own file), and the Auto* classes over it."""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from typing import Any

from loom.configuration import PretrainedConfig, config_from_file, read_config_source


def _family_modules() -> list[str]:
    import loom.models

    return [f"loom.models.{m.name}" for m in pkgutil.iter_modules(loom.models.__path__)]


@functools.cache
def model_table() -> dict[str, tuple[type[PretrainedConfig], dict[str, type]]]:
    """model_type -> (config class, {head: model class}), gathered from each model file's `MODEL_TYPES`."""
    table = {}
    for name in _family_modules():
        table.update(getattr(importlib.import_module(name), "MODEL_TYPES", {}))
    return table


@functools.cache
def public_model_names() -> dict[str, type]:
    """The config and model classes of every family, by name (loom's top-level exports)."""
    return {cls.__name__: cls for config, heads in model_table().values() for cls in (config, *heads.values())}


def supported_types() -> str:
    return ", ".join(sorted(model_table()))


def _entry(model_type: str | None, source: Any):
    table = model_table()
    if model_type not in table:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported by loom; supported types: "
                         f"{supported_types()}")
    return table[model_type]


def config_class_for(model_type: str, source: Any = "config") -> type[PretrainedConfig]:
    return _entry(model_type, source)[0]


def model_class_for(model_type: str, head: str, source: Any = "config"):
    heads = _entry(model_type, source)[1]
    if head not in heads:
        have = ", ".join(sorted(heads))
        raise ValueError(f"{source}: model_type {model_type!r} has no {head} head in loom (it has: {have})")
    return heads[head]


def model_class_by_name(name: str):
    """The loom model class named `name` (an `architectures` entry), or None."""
    cls = public_model_names().get(name)
    return cls if cls is not None and not issubclass(cls, PretrainedConfig) else None


class AutoConfig:
    """Reads config.json (or a GGUF file's metadata, with `gguf_file=`) and returns the config class of its
    model_type."""

    def __init__(self) -> None:
        raise EnvironmentError("use AutoConfig.from_pretrained(path) or AutoConfig.for_model(model_type)")

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        path, data = read_config_source(path_or_id, kwargs)
        cls = config_class_for(data.get("model_type"), path)
        config = config_from_file(cls, path, data, **kwargs)
        config._name_or_path = str(path_or_id)
        return config

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        return config_class_for(model_type)(**kwargs)


class _AutoModel:
    head = "base"

    def __init__(self) -> None:
        raise EnvironmentError(f"use {type(self).__name__}.from_pretrained(path) or .from_config(config)")

    @classmethod
    def model_class(cls, config: PretrainedConfig):
        return model_class_for(config.model_type, cls.head, config._name_or_path or type(config).__name__)

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any):
        return cls.model_class(config).from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *args: Any, **kwargs: Any):
        from loom.adapters import load_with_adapter

        with_adapter = load_with_adapter(cls.from_pretrained, path_or_id, *args, **kwargs)
        if with_adapter is not None:
            return with_adapter
        config = kwargs.pop("config", None)
        if not isinstance(config, PretrainedConfig):
            from loom.hub import HUB_KWARGS

            hub = {k: kwargs[k] for k in kwargs if k in HUB_KWARGS or k == "gguf_file"}
            config_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in ("num_labels", "id2label",
                                                                               "label2id", "problem_type")}
            config = AutoConfig.from_pretrained(config or path_or_id, **hub, **config_overrides)
        return cls.model_class(config).from_pretrained(path_or_id, *args, config=config, **kwargs)


class AutoModel(_AutoModel):
    head = "base"


class AutoModelForCausalLM(_AutoModel):
    head = "causal-lm"


class AutoModelForMaskedLM(_AutoModel):
    head = "masked-lm"


class AutoModelForSequenceClassification(_AutoModel):
    head = "sequence-classification"


class AutoModelForTokenClassification(_AutoModel):
    head = "token-classification"


class AutoModelForQuestionAnswering(_AutoModel):
    head = "question-answering"


class AutoModelForMultipleChoice(_AutoModel):
    head = "multiple-choice"


class AutoModelForNextSentencePrediction(_AutoModel):
    head = "next-sentence-prediction"


class AutoModelForPreTraining(_AutoModel):
    head = "pretraining"


class AutoModelForImageClassification(_AutoModel):
    head = "image-classification"


# The reference's MODEL_FOR_<TASK>_MAPPING tables (config class -> model class) and their *_NAMES twins (model_type ->
# class name), derived from the registry on first access.
_MAPPING_HEADS = {"MODEL": "base", "MODEL_FOR_CAUSAL_LM": "causal-lm", "MODEL_FOR_MASKED_LM": "masked-lm",
                  "MODEL_FOR_SEQUENCE_CLASSIFICATION": "sequence-classification",
                  "MODEL_FOR_TOKEN_CLASSIFICATION": "token-classification",
                  "MODEL_FOR_QUESTION_ANSWERING": "question-answering", "MODEL_FOR_MULTIPLE_CHOICE": "multiple-choice",
                  "MODEL_FOR_NEXT_SENTENCE_PREDICTION": "next-sentence-prediction",
                  "MODEL_FOR_PRETRAINING": "pretraining", "MODEL_FOR_IMAGE_CLASSIFICATION": "image-classification"}


def __getattr__(name: str):
    head = _MAPPING_HEADS.get(name.removesuffix("_NAMES").removesuffix("_MAPPING")) if name.endswith(
        ("_MAPPING", "_MAPPING_NAMES")) else None
    if head is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    rows = [(t, config, heads[head]) for t, (config, heads) in model_table().items() if head in heads]
    if name.endswith("_NAMES"):
        return {t: cls.__name__ for t, _, cls in rows}
    return {config: cls for _, config, cls in rows}


def get_values(mapping: dict) -> list:
    """The values of a MODEL_FOR_*_MAPPING table, a value that is a list or tuple of classes counted one by one."""
    out = []
    for value in mapping.values():
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out
