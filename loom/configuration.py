"""PretrainedConfig: the model hyper-parameters read from and written to config.json.

A config keeps every key it was given, known or not, so load -> save is lossless. Family configs declare their
defaults as a class-level dict and their legacy names (GPT-2's `n_embd`) in `attribute_map`. The known fields are
type-checked when a config is made (`check_field_types`): a default says its field's type, and `field_types` widens
it where the reference takes more (None, lists), so a config the reference loads is never refused.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin

from loom.hub_push import PushToHubMixin

CONFIG_NAME = "config.json"

# Keys every config carries (the reference's common attributes) with their defaults.
_COMMON_DEFAULTS: dict[str, Any] = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "use_cache": True,
    "tie_word_embeddings": True,
    "is_encoder_decoder": False,
    "is_decoder": False,
    "architectures": None,
    "problem_type": None,
    "bos_token_id": None,
    "pad_token_id": None,
    "eos_token_id": None,
    "sep_token_id": None,
    "decoder_start_token_id": None,
    "dtype": None,
}

# `field_types` of the special token ids, for the families whose models read them
TOKEN_ID_TYPES: dict[str, tuple] = {"bos_token_id": (int, None), "pad_token_id": (int, None),
                                    "eos_token_id": (int, list[int], None)}

_INTERNAL = {"_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_internal",
             "_experts_implementation"}


# where a composite config nests its text stack's config, by end (the reference's names)
_DECODER_TEXT_CONFIGS = ("decoder", "generator", "text_config")
_ENCODER_TEXT_CONFIGS = ("text_encoder",)


class ConfigFieldError(ValueError):
    """A config field holds a value of the wrong type (the message names the field and, from a file, the file)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class PreTrainedConfig(PushToHubMixin):
    """Base class for model configurations (`config.json`)."""

    model_type: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # accepted types of the fields whose default does not tell them all (a None default, a field that takes None or
    # a list too); None stands for null; list[int] for a list of ints. A float field also takes ints.
    field_types: ClassVar[dict[str, tuple]] = {}
    attribute_map: ClassVar[dict[str, str]] = {}
    # extra keys that are dropped from `to_dict` because they are derived, not stored
    derived: ClassVar[tuple[str, ...]] = ()
    # nested configs by attribute name (a composite model's `text_config`); loom's families have none
    sub_configs: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__ and cls.defaults:
            cls.__init__ = _init_naming_fields(cls)

    def __init__(self, **kwargs: Any) -> None:
        if "torch_dtype" in kwargs:  # the pre-5.x name of `dtype`
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        kwargs.pop("model_type", None)
        # a load setting, not a stored field; the internal names are not read from config.json (old hub configs
        # carry stale values), as in the reference. Models check the name (`checked_attn_implementation`).
        self._attn_implementation = kwargs.pop("attn_implementation", None)
        for internal in ("_attn_implementation", "_attn_implementation_internal"):
            kwargs.pop(internal, None)
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        values = {**_COMMON_DEFAULTS, **copy.deepcopy(self.defaults)}
        for key, value in kwargs.items():
            values[self.attribute_map.get(key, key)] = value
        check_field_types(type(self), values)
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self._name_or_path = str(kwargs.get("_name_or_path", ""))
        if id2label is not None:
            self.id2label = {int(k): v for k, v in id2label.items()}
        elif num_labels is not None:
            self.num_labels = num_labels
        else:
            self.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        if label2id is not None:  # kept as given, as the reference keeps it (only id2label's keys become ints)
            self.label2id = dict(label2id)
        else:
            self.label2id = {v: k for k, v in self.id2label.items()}
        if num_labels is not None and num_labels != len(self.id2label):
            raise ValueError(f"num_labels={num_labels} does not match id2label, which has {len(self.id2label)} entries; "
                             "pass one of them or make them agree")
        self.__post_init__()

    def __post_init__(self) -> None:
        """Family hook: derive defaults that depend on other fields (e.g. head_dim)."""

    # -- attribute aliases ------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        target = type(self).attribute_map.get(name)
        if target is not None:
            return getattr(self, target)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, type(self).attribute_map.get(name, name), value)

    @property
    def torch_dtype(self):
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value) -> None:
        self.dtype = value

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_labels must be a positive integer, got {n!r}")
        if getattr(self, "id2label", None) is None or len(self.id2label) != n:
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> "PretrainedConfig":
        """The config of the model's text stack, by the reference's rules: the nested `text_encoder` (encoder end) or
        `decoder` / `generator` / `text_config` (decoder end) section when one is set (both ends when `decoder` and
        `encoder` agree), else this config; for one end of a flat encoder-decoder config, a copy whose
        `decoder_*` (or `encoder_*`) keys lose their prefix (`decoder_layers` -> `num_hidden_layers`)."""
        both = decoder == encoder
        names = _ENCODER_TEXT_CONFIGS + _DECODER_TEXT_CONFIGS if both else \
            _DECODER_TEXT_CONFIGS if decoder else _ENCODER_TEXT_CONFIGS
        found = [name for name in names if self.__dict__.get(name) is not None]
        if len(found) > 1:
            raise ValueError(f"get_text_config: this config has several text configs {found}, so the choice is "
                             f"ambiguous; read the one you want directly (config.{found[0]})")
        if found:
            return getattr(self, found[0])
        if both or not self.is_encoder_decoder:
            return self
        return self._one_end(prefix="decoder" if decoder else "encoder")

    def _one_end(self, prefix: str) -> "PretrainedConfig":
        out = copy.deepcopy(self)
        renames = {f"{prefix}_layers": "num_hidden_layers", f"{prefix}_attention_heads": "num_attention_heads"}
        for key in [k for k in out.to_dict() if k.startswith(prefix)]:
            value = out.__dict__.pop(key)
            setattr(out, renames.get(key, key[len(prefix) + 1:]), value)
        return out

    # -- serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key in _INTERNAL or key in self.derived:
                continue
            out[key] = copy.deepcopy(value)
        out["model_type"] = self.model_type
        if out.get("dtype") is not None and not isinstance(out["dtype"], str):
            out["dtype"] = str(out["dtype"]).removeprefix("torch.")
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = dict(self.label2id)
        qc = out.get("quantization_config")
        if qc is not None and hasattr(qc, "to_dict"):
            out["quantization_config"] = qc.to_dict()
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """to_dict without the keys whose value is every config's default (model_type is kept)."""
        common = PretrainedConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "model_type" or k not in common or v != common[k]}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        from loom.utils import atomic_write_text

        atomic_write_text(Path(path), self.to_json_string())

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write config.json; push_to_hub=True then uploads it (`repo_id`, `commit_message`, `private`, `token`)."""
        from loom.hub import push_settings, upload_files

        push = push_settings(kwargs, push_to_hub, save_directory, "save_pretrained")
        save_directory = Path(save_directory)
        if save_directory.exists() and not save_directory.is_dir():
            raise NotADirectoryError(f"save_pretrained: {save_directory} exists and is not a directory")
        save_directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(save_directory / CONFIG_NAME)
        if push is not None:
            upload_files(save_directory, [CONFIG_NAME], push, "Upload config")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "PretrainedConfig":
        return_unused = kwargs.pop("return_unused_kwargs", False)
        config = cls(**{**config_dict, **kwargs})
        return (config, {}) if return_unused else config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PretrainedConfig":
        return config_from_file(cls, Path(path), read_config_dict(Path(path)))

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> "PretrainedConfig":
        """Read `config.json` from a directory, the HF cache or the hub (or a GGUF file's metadata, with
        `gguf_file=`); keyword arguments override its values."""
        path, data = read_config_source(path_or_id, kwargs)
        config = config_from_file(cls, path, data, **kwargs)
        config._name_or_path = str(path_or_id)
        return config

    def __iter__(self):
        """The names of the attributes set on this config (the reference's configs iterate so)."""
        yield from list(self.__dict__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PretrainedConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _init_naming_fields(cls: type) -> Any:
    """An __init__ for a family config whose signature names its fields with their defaults, as the reference's
    configs do (code builds configs from `inspect.signature(Config.__init__)`); it calls the inherited one."""
    inherited = cls.__init__

    def __init__(self, **kwargs: Any) -> None:
        inherited(self, **kwargs)

    P = inspect.Parameter
    __init__.__signature__ = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(k, P.KEYWORD_ONLY, default=v) for k, v in cls.defaults.items()]
        + [P("kwargs", P.VAR_KEYWORD)])
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


# The class carries the reference's 5.x name (code that checks a class's MRO by name looks for it); 4.x wrote
# PretrainedConfig, and both names stay importable there.
PretrainedConfig = PreTrainedConfig


def check_field_types(cls: type[PretrainedConfig], values: dict[str, Any]) -> None:
    """Raise ConfigFieldError for the first known field of `cls` whose value has the wrong type. ints are not bools,
    floats take ints; a field with a None default and no `field_types` entry takes anything."""
    for key, value in values.items():
        kinds = cls.field_types.get(key) or _kinds_of(cls.defaults.get(key))
        if kinds and not any(_is(value, kind) for kind in kinds):
            expected = " or ".join(_type_name(kind) for kind in kinds)
            raise ConfigFieldError(f"{cls.__name__}: {key}={value!r} is {_type_name(type(value))}, but {key} must be "
                                   f"{expected}; fix the value", key)


def _kinds_of(default: Any) -> tuple:
    for kind in (bool, int, float, str, dict, list):
        if isinstance(default, kind):
            return (kind,)
    return ()


def _is(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if kind in (int, float):
        return isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    if get_origin(kind) is list:
        return isinstance(value, list) and all(_is(v, get_args(kind)[0]) for v in value)
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    if kind is None or kind is type(None):
        return "null"
    return str(kind) if get_origin(kind) else {"str": "a string", "dict": "a dict (JSON object)", "list": "a list",
                                              "int": "an int", "float": "a float", "bool": "a bool (true/false)"
                                              }.get(kind.__name__, kind.__name__)


def config_from_file(cls: type[PretrainedConfig], path: Path, data: dict[str, Any], **kwargs: Any):
    """`cls.from_dict(data, **kwargs)`, with a wrongly typed field that came from the file blamed on the file."""
    try:
        return cls.from_dict(data, **kwargs)
    except ConfigFieldError as e:
        if e.field in kwargs or e.field not in {cls.attribute_map.get(k, k) for k in data}:
            raise
        raise ConfigFieldError(f"{path}: {e}", e.field) from None


def read_config_source(path_or_id, kwargs: dict) -> tuple[Path, dict[str, Any]]:
    """(file, config dict) of a model: its config.json, or with `gguf_file` in kwargs that GGUF file's metadata;
    the hub keywords and `gguf_file` are taken out of kwargs."""
    from loom.hub import pop_hub_kwargs, resolve_file

    hub = pop_hub_kwargs(kwargs)
    gguf_file = kwargs.pop("gguf_file", None)
    if gguf_file is not None:
        from loom.gguf.config import gguf_config_source

        return gguf_config_source(path_or_id, gguf_file, hub)
    path = resolve_file(path_or_id, CONFIG_NAME, **hub)
    return path, read_config_dict(path)


def read_config_dict(path: Path) -> dict[str, Any]:
    """Parse a config.json, with an error that names the file on failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OSError(f"{path} does not exist: a model directory needs a config.json") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise OSError(f"{path} is not valid JSON ({e}); fix or regenerate the file") from None
    if not isinstance(data, dict):
        raise OSError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def checked_attn_implementation(config: PretrainedConfig, name: str | None = None) -> str:
    """The attention a config asks for (`attn_implementation`, or `name` when given), checked: loom runs "sdpa" (the
    default; "eager" when config.output_attentions is set, as the reference chooses) and "eager"; any other name is an
    error, never ignored. A forward asked for output_attentions=True computes them eagerly under either."""
    if name is None:
        name = getattr(config, "_attn_implementation", None)
    wants_probs = bool(getattr(config, "output_attentions", False))
    if name is None:
        return "eager" if wants_probs else "sdpa"
    if name in ATTN_IMPLEMENTATIONS:
        if wants_probs and name != "eager":
            # the reference refuses this pair too: a config that always returns attentions never runs "sdpa"
            raise ValueError(f'config output_attentions=True asks every forward for the attention probabilities, which '
                             f'attn_implementation="{name}" never forms; use attn_implementation="eager"')
        softcap = getattr(config, "attn_logit_softcapping", None)
        if name == "sdpa" and softcap is not None:  # the reference refuses "sdpa" for Gemma 2 too
            raise ValueError(f"attn_implementation='sdpa' cannot soft-cap the attention scores (config "
                             f"attn_logit_softcapping={softcap}); only 'eager' does: use attn_implementation='eager'")
        return name
    text = str(name)
    if "flash_attention" in text:
        why = ("FlashAttention needs a CUDA GPU and the flash-attn package, which loom does not support (on CUDA, "
               "'sdpa' runs PyTorch's own flash kernel where it applies)")
    elif "flex_attention" in text:
        why = "loom has no path through torch's flex_attention"
    elif "paged" in text:
        why = "paged attention (continuous batching) is not part of loom"
    else:
        why = "loom implements 'sdpa' (the default) and 'eager' (the math written out, for output_attentions=True)"
    # the opening words are the reference's own, which callers match on
    raise ValueError(f"Specified `attn_implementation=\"{name}\"` is not supported: {why}; pass "
                     "attn_implementation='sdpa' or 'eager'")
