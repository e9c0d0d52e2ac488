"""save_pretrained: tokenizer.json + tokenizer_config.json (+ chat_template.jinja), readable by loom and the reference.

The config keeps the settings the tokenizer was loaded with (so the reference rebuilds the same class), plus the
current special tokens, sides, input names and model_max_length; the engine file carries vocabulary, added tokens
and the post-processor. Files are written atomically; push_to_hub=True then uploads them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..hub import push_settings, upload_files
from ..utils import atomic_write_text
from .arguments import LARGE_INTEGER

_DROP = {"add_bos_token", "add_eos_token", "added_tokens_decoder", "additional_special_tokens", "name_or_path",
         "tokenizer_file", "vocab_file", "merges_file", "special_tokens_map_file", "chat_template", "model_max_length",
         "files_loaded", "is_local", "local_files_only", "extra_special_tokens"}


def _class_name(tok) -> str:
    # the class the files came with, so the reference rebuilds the same pipeline; "Fast" names are its aliases
    name = tok._tokenizer_class or "PreTrainedTokenizerFast"
    return name if name == "PreTrainedTokenizerFast" else name.removesuffix("Fast")


def _config(tok) -> dict:
    config = {k: v for k, v in tok._init_extra.items() if k not in _DROP and not k.startswith("_")}
    config.update(tok.special_tokens_map)
    if tok.extra_special_tokens:
        config["extra_special_tokens"] = tok.extra_special_tokens
    if tok.model_max_length < LARGE_INTEGER:  # an unknown limit is left out rather than written as 1e30
        config["model_max_length"] = tok.model_max_length
    config.update(padding_side=tok.padding_side, truncation_side=tok.truncation_side,
                  model_input_names=list(tok.model_input_names),
                  clean_up_tokenization_spaces=tok.clean_up_tokenization_spaces,
                  split_special_tokens=tok.split_special_tokens, tokenizer_class=_class_name(tok))
    if isinstance(tok.chat_template, dict):
        config["chat_template"] = [{"name": k, "template": v} for k, v in tok.chat_template.items()]
    return config


def _engine_json(tok) -> str:
    # per-call truncation/padding live on the engine while encoding; they are not part of the saved tokenizer
    engine = tok.backend_tokenizer
    engine.no_truncation()
    engine.no_padding()
    tok._engine_truncation = None
    return engine.to_str(pretty=True)


def save_pretrained(tok, save_directory: str | os.PathLike, legacy_format: bool | None = None,
                    filename_prefix: str | None = None, push_to_hub: bool = False, save_jinja_files: bool = True,
                    **kwargs) -> tuple[str, ...]:
    """Write the tokenizer files into `save_directory` (created if needed); returns their paths."""
    push = push_settings(kwargs, push_to_hub, save_directory, "save_pretrained")
    if legacy_format:
        raise ValueError("save_pretrained(legacy_format=True) is not supported: loom writes the tokenizer.json "
                         "format only; leave legacy_format unset (or False)")
    directory = Path(save_directory)
    if directory.is_file():
        raise NotADirectoryError(f"save_pretrained needs a directory, but {directory} is a file")
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"{filename_prefix}-" if filename_prefix else ""
    written = []
    config = _config(tok)
    if isinstance(tok.chat_template, str) and save_jinja_files:
        path = directory / f"{prefix}chat_template.jinja"
        atomic_write_text(path, tok.chat_template)
        written.append(path)
    elif isinstance(tok.chat_template, str):  # save_jinja_files=False: inside the config, the older layout
        config["chat_template"] = tok.chat_template
    config_path = directory / f"{prefix}tokenizer_config.json"
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    engine_path = directory / f"{prefix}tokenizer.json"
    atomic_write_text(engine_path, _engine_json(tok))
    paths = (config_path, *written, engine_path)
    if push is not None:
        upload_files(directory, [p.name for p in paths], push, "Upload tokenizer")
    return tuple(str(p) for p in paths)
