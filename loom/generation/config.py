"""GenerationConfig: decoding settings, read from and written to generation_config.json."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"

_DEFAULTS: dict[str, Any] = dict(
    max_length=20, max_new_tokens=None, min_length=0, min_new_tokens=None, early_stopping=False,
    do_sample=False, num_beams=1, num_return_sequences=1, temperature=1.0, top_k=50, top_p=1.0, min_p=None,
    typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None, forced_bos_token_id=None,
    forced_eos_token_id=None, suppress_tokens=None, length_penalty=1.0, use_cache=True, stop_strings=None,
    pad_token_id=None, bos_token_id=None, eos_token_id=None, decoder_start_token_id=None,
    output_scores=False, output_logits=False, return_dict_in_generate=False, cache_implementation=None,
)


class GenerationConfig:
    """Decoding parameters; unknown keys are kept so a round trip through JSON is lossless."""

    def __init__(self, **kwargs: Any) -> None:
        for key, value in {**_DEFAULTS, **kwargs}.items():
            setattr(self, key, copy.deepcopy(value))

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                     "decoder_start_token_id")}
        return cls(**{k: v for k, v in ids.items() if v is not None})

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> "GenerationConfig":
        data = {k: v for k, v in data.items() if k != "transformers_version"}
        return cls(**{**data, **kwargs})

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, config_file_name: str | None = None,
                        **kwargs: Any) -> "GenerationConfig":
        from loom.hub import resolve_file

        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in ("cache_dir", "revision", "subfolder",
                                                              "local_files_only", "token")}
        path = resolve_file(path_or_id, config_file_name or GENERATION_CONFIG_NAME, **hub)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise OSError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(data, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def to_diff_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _DEFAULTS or _DEFAULTS[k] != v}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None) -> None:
        from loom.utils import atomic_write_text

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(save_directory / (config_file_name or GENERATION_CONFIG_NAME), self.to_json_string())

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known keys; return the ones that are not generation settings."""
        unused = {}
        for k, v in kwargs.items():
            if hasattr(self, k):
                setattr(self, k, v)
            else:
                unused[k] = v
        return unused

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"GenerationConfig {self.to_json_string()}"
