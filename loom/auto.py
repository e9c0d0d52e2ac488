"""One table from model_type to its config class and its model class per head, and the Auto* classes over it."""
from __future__ import annotations

import importlib
import os
from typing import Any

from loom.configuration import CONFIG_NAME, PretrainedConfig, config_from_file, read_config_dict

# model_type -> (module, config class, {head: model class})
MODEL_TABLE: dict[str, tuple[str, str, dict[str, str]]] = {
    "bert": ("loom.models.bert", "BertConfig", {
        "base": "BertModel", "masked-lm": "BertForMaskedLM", "sequence-classification": "BertForSequenceClassification",
        "token-classification": "BertForTokenClassification", "question-answering": "BertForQuestionAnswering"}),
    "gpt2": ("loom.models.gpt2", "GPT2Config", {
        "base": "GPT2Model", "causal-lm": "GPT2LMHeadModel", "sequence-classification": "GPT2ForSequenceClassification"}),
    "llama": ("loom.models.llama", "LlamaConfig", {
        "base": "LlamaModel", "causal-lm": "LlamaForCausalLM", "sequence-classification": "LlamaForSequenceClassification"}),
    "mistral": ("loom.models.mistral", "MistralConfig", {
        "base": "MistralModel", "causal-lm": "MistralForCausalLM",
        "sequence-classification": "MistralForSequenceClassification"}),
    "qwen2": ("loom.models.qwen2", "Qwen2Config", {
        "base": "Qwen2Model", "causal-lm": "Qwen2ForCausalLM", "sequence-classification": "Qwen2ForSequenceClassification"}),
    "vit": ("loom.models.vit", "ViTConfig", {"base": "ViTModel", "image-classification": "ViTForImageClassification"}),
}


def supported_types() -> str:
    return ", ".join(sorted(MODEL_TABLE))


def _entry(model_type: str | None, source: Any):
    if model_type not in MODEL_TABLE:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported by loom; supported types: "
                         f"{supported_types()}")
    return MODEL_TABLE[model_type]


def config_class_for(model_type: str, source: Any = "config") -> type[PretrainedConfig]:
    module, name, _ = _entry(model_type, source)
    return getattr(importlib.import_module(module), name)


def model_class_for(model_type: str, head: str, source: Any = "config"):
    module, _, heads = _entry(model_type, source)
    if head not in heads:
        have = ", ".join(sorted(heads))
        raise ValueError(f"{source}: model_type {model_type!r} has no {head} head in loom (it has: {have})")
    return getattr(importlib.import_module(module), heads[head])


def model_class_by_name(name: str):
    """The loom class named `name` (an `architectures` entry), or None."""
    for module, _, heads in MODEL_TABLE.values():
        if name in heads.values():
            return getattr(importlib.import_module(module), name)
    return None


class AutoConfig:
    """Reads config.json and returns the config class of its model_type."""

    def __init__(self) -> None:
        raise EnvironmentError("use AutoConfig.from_pretrained(path) or AutoConfig.for_model(model_type)")

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        from loom.hub import pop_hub_kwargs, resolve_file

        path = resolve_file(path_or_id, CONFIG_NAME, **pop_hub_kwargs(kwargs))
        data = read_config_dict(path)
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
        config = kwargs.pop("config", None)
        if not isinstance(config, PretrainedConfig):
            from loom.hub import HUB_KWARGS

            hub = {k: kwargs[k] for k in kwargs if k in HUB_KWARGS}
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


class AutoModelForImageClassification(_AutoModel):
    head = "image-classification"
