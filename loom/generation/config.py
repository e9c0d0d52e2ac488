"""GenerationConfig: decoding settings, read from and written to generation_config.json.

As in the reference (5.x), every field starts unset (None). At generate time the layers are merged: the arguments of
the call, then the model's `generation_config`, then `GLOBAL_DEFAULTS` for whatever is still unset. Only set fields
are written to disk, so a file stays small and lossless; unknown keys are kept.
"""
from __future__ import annotations

import copy
import enum
import json
import os
from pathlib import Path
from typing import Any

from loom.hub_push import PushToHubMixin

GENERATION_CONFIG_NAME = "generation_config.json"

# the cache_implementation values loom's generate accepts (the reference also has offloaded, quantized, ... ones)
ALL_CACHE_IMPLEMENTATIONS = ("static", "dynamic")

FIELDS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time", "stop_strings",
    "do_sample", "num_beams", "use_cache", "cache_implementation", "temperature", "top_k", "top_p", "min_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "num_return_sequences", "output_scores",
    "output_logits", "output_hidden_states", "output_attentions", "return_dict_in_generate", "pad_token_id",
    "bos_token_id", "eos_token_id", "decoder_start_token_id", "compile", "sequence_bias", "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size", "remove_invalid_values", "exponential_decay_length_penalty", "top_h",
    "epsilon_cutoff", "eta_cutoff", "renormalize_logits", "begin_suppress_tokens", "cache_config",
    "watermarking_config", "assistant_ensemble_weight",
)

# Values used when neither the call nor the model's generation config sets a field (the reference's defaults).
GLOBAL_DEFAULTS: dict[str, Any] = dict(
    max_length=20, min_length=0, do_sample=False, use_cache=True, early_stopping=False, num_beams=1,
    temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, length_penalty=1.0,
    no_repeat_ngram_size=0, num_return_sequences=1, output_scores=False, output_logits=False,
    output_hidden_states=False, output_attentions=False, return_dict_in_generate=False, compile=False,
)



class GenerationMode(str, enum.Enum):
    """The decoding method a config asks for (the reference's names; loom's generate runs greedy, sample, beam
    search and beam sample, and refuses the others by their arguments)."""

    CONTRASTIVE_SEARCH = "contrastive_search"
    GREEDY_SEARCH = "greedy_search"
    SAMPLE = "sample"
    ASSISTED_GENERATION = "assisted_generation"
    DOLA_GENERATION = "dola_generation"
    BEAM_SEARCH = "beam_search"
    BEAM_SAMPLE = "beam_sample"
    CONSTRAINED_BEAM_SEARCH = "constrained_beam_search"
    GROUP_BEAM_SEARCH = "group_beam_search"


def _plain(value: Any) -> Any:
    """A field as JSON-ready data: config objects (watermarking_config) become their dicts."""
    return value.to_dict() if hasattr(value, "to_dict") else copy.deepcopy(value)


_MODEL_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


class GenerationConfig(PushToHubMixin):
    """Decoding parameters. Fields left unset are None; unknown keys are kept so a JSON round trip is lossless."""

    def __init__(self, **kwargs: Any) -> None:
        for key in FIELDS:
            setattr(self, key, None)
        kwargs.pop("transformers_version", None)
        for key, value in kwargs.items():
            setattr(self, key, copy.deepcopy(value))
        if isinstance(self.watermarking_config, dict):
            from loom.generation.watermarking import watermarking_config_from

            self.watermarking_config = watermarking_config_from(self.watermarking_config)

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """The special token ids of a model config (what the reference writes as `_from_model_config`)."""
        ids = {k: getattr(config, k, None) for k in _MODEL_CONFIG_KEYS}
        return cls(**{k: v for k, v in ids.items() if v is not None}, _from_model_config=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> "GenerationConfig":
        return cls(**{**data, **kwargs})

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, config_file_name: str | None = None,
                        **kwargs: Any) -> "GenerationConfig":
        """Read generation_config.json (or `config_file_name`, also spelled `config_name`); kwargs override."""
        from loom.hub import pop_hub_kwargs, resolve_file

        config_file_name = config_file_name or kwargs.pop("config_name", None)
        path = resolve_file(path_or_id, config_file_name or GENERATION_CONFIG_NAME, **pop_hub_kwargs(kwargs))
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise OSError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(data, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.__dict__.items()}

    def to_diff_dict(self) -> dict[str, Any]:
        """The fields that are set (not None) plus any extra keys."""
        return {k: _plain(v) for k, v in self.__dict__.items() if v is not None}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None,
                        push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write generation_config.json; push_to_hub=True then uploads it (the upload settings of the model's)."""
        from loom.hub import push_settings, upload_files
        from loom.utils import atomic_write_text

        config_file_name = config_file_name or kwargs.pop("config_name", None)
        push = push_settings(kwargs, push_to_hub, save_directory, "save_pretrained")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        name = config_file_name or GENERATION_CONFIG_NAME
        atomic_write_text(save_directory / name, self.to_json_string())
        if push is not None:
            upload_files(save_directory, [name], push, "Upload config")

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the generation fields among kwargs; return the others (model inputs such as attention_mask)."""
        unused = {}
        for k, v in kwargs.items():
            if k in FIELDS or k in self.__dict__:
                setattr(self, k, v)
            else:
                unused[k] = v
        return unused

    def merged(self, model_config: "GenerationConfig | None", **kwargs: Any) -> tuple["GenerationConfig", dict]:
        """This config, with unset fields taken from `model_config` and then GLOBAL_DEFAULTS, and kwargs on top.

        Returns (new config, kwargs that are not generation fields)."""
        out = copy.deepcopy(self)
        for layer in ((model_config.__dict__ if model_config is not None else {}), GLOBAL_DEFAULTS):
            for k, v in layer.items():
                if getattr(out, k, None) is None:
                    setattr(out, k, copy.deepcopy(v))
        return out, out.update(**kwargs)

    def get_generation_mode(self, assistant_model=None) -> GenerationMode:
        """The decoding method these settings select, decided as the reference decides it (unset fields count as
        their defaults; the arguments of methods loom lacks are read from the kept unknown keys)."""
        extra = self.__dict__.get
        if extra("constraints") is not None or extra("force_words_ids") is not None:
            return GenerationMode.CONSTRAINED_BEAM_SEARCH
        if (self.num_beams or 1) > 1:
            if (extra("num_beam_groups") or 1) > 1:
                return GenerationMode.GROUP_BEAM_SEARCH
            return GenerationMode.BEAM_SAMPLE if self.do_sample is True else GenerationMode.BEAM_SEARCH
        if self.do_sample is True:
            mode = GenerationMode.SAMPLE
        elif (self.top_k or 0) > 1 and (extra("penalty_alpha") or 0) > 0:
            return GenerationMode.CONTRASTIVE_SEARCH
        else:
            mode = GenerationMode.GREEDY_SEARCH
        if (assistant_model is not None or extra("prompt_lookup_num_tokens") is not None or extra("use_mtp")
                or extra("assistant_early_exit") is not None):
            return GenerationMode.ASSISTED_GENERATION
        return GenerationMode.DOLA_GENERATION if extra("dola_layers") is not None else mode

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work, naming the argument."""
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.num_beams is not None and self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        beams = self.num_beams or 1
        if (self.num_return_sequences or 1) > beams and not self.do_sample:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({beams}) "
                             "without sampling; raise num_beams or set do_sample=True")
        if self.do_sample:
            if self.temperature is not None and not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use "
                                 "do_sample=False for greedy decoding")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
                raise ValueError(f"top_k must be a non-negative int, got {self.top_k}")
            if self.min_p is not None and not 0 <= self.min_p <= 1:
                raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
            if self.typical_p is not None and not 0 < self.typical_p <= 1:
                raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if self.assistant_ensemble_weight is not None and not 0.0 < self.assistant_ensemble_weight < 1.0:
            raise ValueError(f"assistant_ensemble_weight must be strictly between 0 and 1, got "
                             f"{self.assistant_ensemble_weight}; leave it None for lossless assisted decoding")
        if self.watermarking_config is not None:
            self.watermarking_config.validate()
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.cache_implementation not in (None, *ALL_CACHE_IMPLEMENTATIONS):
            raise ValueError(f"cache_implementation={self.cache_implementation!r} is not supported; use 'dynamic' "
                             "or 'static'")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"GenerationConfig {self.to_json_string()}"
