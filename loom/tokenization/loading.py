"""Finding and reading a tokenizer's files: tokenizer.json or a legacy format, plus its configs.

`load_pretrained` returns the `tokenizers` engine and the keyword arguments for the tokenizer class. Precedence
for settings, lowest first: the family's defaults, tokenizer_config.json, special_tokens_map.json (only when the
config has no added_tokens_decoder, as in the reference), then the caller's keyword arguments.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from ..hub import pop_hub_kwargs, resolve_file
from . import convert
from .families import Family, family_for, model_max_length_from
from .spm_proto import read_spm_model

# the order the reference gives named special tokens their ids when they are new to the vocabulary
SPECIAL_TOKENS_ORDER = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SPM_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "spm.model")
IGNORED_KWARGS = ("use_fast", "resume_download", "_from_auto")
# tokenizer_config.json keys that describe files or the loader, not the tokenizer
_NOT_SETTINGS = {"tokenizer_class", "auto_map", "added_tokens_decoder", "tokenizer_file", "vocab_file",
                 "merges_file", "name_or_path", "special_tokens_map_file", "init_inputs", "files_loaded"}


def read_json(path: Path) -> dict:
    """Parse a JSON object file, or raise an OSError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OSError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated: re-download or "
                      "re-save it") from None
    if not isinstance(data, dict):
        raise OSError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def load_engine_file(path: Path) -> Tokenizer:
    """`tokenizers.Tokenizer.from_file` with an OSError that names the file when it is not a valid tokenizer."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise OSError(f"{path} is not a valid tokenizer.json ({e}); the file is corrupt or was written by a "
                      "newer `tokenizers` version: re-download it or upgrade `tokenizers`") from None


def as_added_token(value):
    """A special-token value from a config: a str, or a serialised AddedToken dict."""
    if isinstance(value, dict) and "content" in value:
        fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **fields)
    return value


def _special_settings(settings: dict) -> dict:
    out = {}
    for key, value in settings.items():
        if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
            out["extra_special_tokens"] = [as_added_token(v) for v in value]
        elif key.endswith("_token") or key == "extra_special_tokens":
            out[key] = as_added_token(value)
        else:
            out[key] = value
    return out


class _Files:
    def __init__(self, path_or_id, hub_kwargs: dict):
        self.source, self.hub_kwargs = path_or_id, hub_kwargs

    def get(self, name: str) -> Path | None:
        return resolve_file(self.source, name, required=False, **self.hub_kwargs)


def _legacy_engine(files: _Files, family: Family, init: dict) -> tuple[Tokenizer, str]:
    vocab_txt = files.get("vocab.txt")
    if vocab_txt is not None:
        engine = convert.wordpiece_tokenizer(
            vocab_txt, unk_token=str(init.get("unk_token", "[UNK]")), cls_token=str(init.get("cls_token", "[CLS]")),
            sep_token=str(init.get("sep_token", "[SEP]")), do_lower_case=init.get("do_lower_case", True),
            strip_accents=init.get("strip_accents"), tokenize_chinese_chars=init.get("tokenize_chinese_chars", True),
            clean_text=init.get("clean_text", True))
        return engine, str(vocab_txt)
    vocab_json, merges = files.get("vocab.json"), files.get("merges.txt")
    if vocab_json is not None and merges is not None:
        try:
            engine = convert.byte_level_bpe_tokenizer(vocab_json, merges,
                                                      add_prefix_space=init.get("add_prefix_space", False))
        except Exception as e:
            raise OSError(f"could not read the BPE files {vocab_json} and {merges}: {e}") from None
        return engine, str(vocab_json)
    for name in SPM_FILES:
        spm_file = files.get(name)
        if spm_file is not None:
            model = read_spm_model(spm_file)
            if family.spm_flavour == "t5":
                extra_ids = _t5_sentinels(init, spm_file)
                return convert.sentencepiece_tokenizer(model, "t5", extra_ids), str(spm_file)
            if family.post_processor == "fairseq":  # the family's specials are in its dictionary
                return convert.sentencepiece_tokenizer(model, family.spm_flavour), str(spm_file)
            named, controls = convert.spm_special_tokens(model)
            for key, value in named.items():
                init.setdefault(key, value)
            if "extra_special_tokens" not in init and controls:
                init["extra_special_tokens"] = [AddedToken(c, special=True, normalized=False) for c in controls]
            if family.spm_flavour == "deberta-v2":
                engine = convert.deberta_v2_tokenizer(
                    model, do_lower_case=init.get("do_lower_case", False),
                    split_by_punct=init.get("split_by_punct", False),
                    add_prefix_space=init.get("add_prefix_space", True))
                return engine, str(spm_file)
            return convert.sentencepiece_tokenizer(model, family.spm_flavour), str(spm_file)
    raise OSError(f"no tokenizer files found for '{files.source}': expected tokenizer.json, or vocab.txt, or "
                  f"vocab.json + merges.txt, or a SentencePiece model ({', '.join(SPM_FILES)})")


def _t5_sentinels(init: dict, spm_file: Path) -> int:
    """How many `<extra_id_N>` sentinels T5 appends, with them listed as extra special tokens (as the reference)."""
    extra_ids = init.get("extra_ids", 100)
    if not isinstance(extra_ids, int) or isinstance(extra_ids, bool) or extra_ids < 0:
        raise ValueError(f"extra_ids must be an int >= 0 (T5's sentinel count), got {extra_ids!r}")
    listed = init.get("extra_special_tokens")
    if listed is None:
        init["extra_special_tokens"] = [f"<extra_id_{i}>" for i in range(extra_ids)]
        return extra_ids
    # a list without sentinels keeps them as plain vocabulary pieces, not special tokens (as the reference does)
    named = [t for t in listed if "<extra_id_" in str(t)]
    if named and extra_ids > 0 and len(named) != extra_ids:
        raise ValueError(f"extra_ids={extra_ids} but the additional special tokens for {spm_file} name {len(named)} "
                         "<extra_id_N> sentinels; list all of them, or set extra_ids to their number")
    return extra_ids


def _finish_family(engine: Tokenizer, family: Family, init: dict) -> None:
    """Give the family's special tokens ids (in the reference's order), then build the family's post-processor."""
    if family.post_processor is None:
        return
    present = {t.content for t in engine.get_added_tokens_decoder().values()}
    for name in SPECIAL_TOKENS_ORDER:
        token = init.get(name)
        if token is not None and str(token) not in present:
            if isinstance(token, str):
                token = AddedToken(token, special=True, normalized=False)
            engine.add_special_tokens([token])
            present.add(str(token))
    if family.post_processor == "bert":
        engine.post_processor = convert.bert_processor(engine, family.name, init.get("cls_token"),
                                                       init.get("sep_token"))
    elif family.post_processor == "roberta":
        engine.post_processor = convert.roberta_processor(
            engine, init.get("cls_token"), init.get("sep_token"),
            trim_offsets=init.get("trim_offsets", True), add_prefix_space=init.get("add_prefix_space", False))
    elif family.post_processor == "fairseq":
        engine.post_processor = convert.fairseq_processor(engine, init.get("bos_token"), init.get("eos_token"))
    else:
        engine.post_processor = convert.t5_processor(engine, init.get("eos_token"))


def _add_saved_tokens(engine: Tokenizer, config: dict, files: _Files, init: dict) -> None:
    """Tokens added after training, listed in tokenizer_config.json or added_tokens.json (legacy formats only)."""
    tokens: dict[int, AddedToken] = {}
    for index, value in (config.get("added_tokens_decoder") or {}).items():
        value = dict(value)
        content = value.pop("content")
        fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        tokens[int(index)] = AddedToken(content, **fields)
    added_file = files.get("added_tokens.json")
    if added_file is not None:
        specials = {str(v) for k, v in init.items() if k.endswith("_token") and v is not None}
        for content, index in read_json(added_file).items():
            special = content in specials
            tokens.setdefault(int(index), AddedToken(content, special=special, normalized=not special))
    for index in sorted(tokens):
        token = tokens[index]
        (engine.add_special_tokens if token.special else engine.add_tokens)([token])


def load_pretrained(path_or_id, **kwargs) -> tuple[Tokenizer, dict]:
    """The engine and the tokenizer-class keyword arguments for a model directory or hub id."""
    hub_kwargs = pop_hub_kwargs(kwargs)
    if hub_kwargs.get("subfolder") is None:
        hub_kwargs.pop("subfolder", None)
    for key in IGNORED_KWARGS:  # accepted for compatibility: loom always uses the Rust engine, never remote code
        kwargs.pop(key, None)
    files = _Files(path_or_id, hub_kwargs)
    config_file = files.get("tokenizer_config.json")
    config = read_json(config_file) if config_file else {}
    model_config_file = files.get("config.json")
    model_config = read_json(model_config_file) if model_config_file else None
    tokenizer_class = config.get("tokenizer_class") or (model_config or {}).get("tokenizer_class")
    family = family_for(tokenizer_class, (model_config or {}).get("model_type"))

    init = dict(family.special_tokens)
    init["model_input_names"] = list(family.model_input_names)
    init["padding_side"] = family.padding_side
    init.update(_special_settings({k: v for k, v in config.items() if k not in _NOT_SETTINGS}))
    special_map_file = files.get("special_tokens_map.json")
    if special_map_file is not None and "added_tokens_decoder" not in config:
        init.update(_special_settings(read_json(special_map_file)))
    init.update(_special_settings(kwargs))

    engine_file = files.get("tokenizer.json")
    if engine_file is not None:
        engine, source = load_engine_file(engine_file), str(engine_file)
        # tokenizer.json's post-processor already says which special tokens surround a sequence
        for key in ("add_bos_token", "add_eos_token"):
            if key not in kwargs:
                init.pop(key, None)
    else:
        engine, source = _legacy_engine(files, family, init)
        _add_saved_tokens(engine, config, files, init)
        _finish_family(engine, family, init)

    template_file = files.get("chat_template.jinja")
    if template_file is not None and "chat_template" not in kwargs:
        init["chat_template"] = template_file.read_text(encoding="utf-8")
    if "model_max_length" not in kwargs:
        limit = model_max_length_from(config, model_config)
        if limit is None:
            init.pop("model_max_length", None)
        else:
            init["model_max_length"] = limit
    init["name_or_path"] = str(path_or_id)
    init["_tokenizer_class"] = tokenizer_class
    init["_source_file"] = source
    return engine, init
