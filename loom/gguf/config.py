"""A GGUF file's metadata -> the config dict of a loom model (the reference's field names).

llama.cpp stores hyper-parameters as `<architecture>.<key>`; the architectures below are the ones whose tensors
and metadata map onto a loom family one to one. Mistral files say `llama` (llama.cpp runs them as Llama); as in the
reference, a file named "mistral" loads as Mistral.
"""
from __future__ import annotations

from typing import Any

# llama.cpp key (after the architecture prefix) -> config field
_COMMON_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
                "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
                "rope.freq_base": "rope_theta", "attention.head_count": "num_attention_heads",
                "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
                "vocab_size": "vocab_size"}
# the head size: Llama's rotary dimension is its head size; Qwen 3 states it (its heads are not hidden / heads)
ARCHITECTURES = {"llama": {**_COMMON_KEYS, "rope.dimension_count": "head_dim"},
                 "qwen2": _COMMON_KEYS,
                 "qwen3": {**_COMMON_KEYS, "attention.key_length": "head_dim"}}
_TOKEN_IDS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
              "tokenizer.ggml.padding_token_id": "pad_token_id"}


def architecture_of(meta: dict[str, Any], path) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF general.architecture={arch!r} is not one loom can load from GGUF (it loads "
                         f"{', '.join(sorted(ARCHITECTURES))}); convert the original Hugging Face checkpoint instead, "
                         "or load this file with llama.cpp")
    return arch


def config_dict(meta: dict[str, Any], tensor_names: list[str], path) -> dict[str, Any]:
    """The config dict (with model_type) that `meta` (read with arrays=False: arrays as their lengths) describes;
    `tensor_names` tells whether the head is tied."""
    arch = architecture_of(meta, path)
    out: dict[str, Any] = {"model_type": arch}
    if arch == "llama" and meta.get("general.name") == "mistral":
        out["model_type"] = "mistral"
    for key, field in ARCHITECTURES[arch].items():
        if f"{arch}.{key}" in meta:
            out[field] = meta[f"{arch}.{key}"]
    for key, field in _TOKEN_IDS.items():
        if key in meta:
            out[field] = meta[key]
    if "vocab_size" not in out and "tokenizer.ggml.tokens" in meta:  # the vocabulary's length (arrays=False)
        out["vocab_size"] = meta["tokenizer.ggml.tokens"]
    for field in ("rope_theta", "rms_norm_eps"):
        if field in out:
            out[field] = float(out[field])
    out["tie_word_embeddings"] = "output.weight" not in tensor_names
    return out


def read_gguf_config(path) -> dict[str, Any]:
    """The config dict of the GGUF file at `path`."""
    from loom.gguf.reader import open_gguf

    gguf = open_gguf(path, arrays=False)
    return config_dict(gguf.fields, [t.name for t in gguf.tensors], path)


def gguf_config_source(path_or_id, gguf_file, hub_kwargs: dict):
    """(path, config dict) for `from_pretrained(path_or_id, gguf_file=...)`: the file's metadata is its config."""
    from loom.gguf.reader import find_gguf

    path = find_gguf(path_or_id, gguf_file, **hub_kwargs)
    return path, read_gguf_config(path)
