"""Writing small GGUF files the way llama.cpp's convert_hf_to_gguf.py does, for the GGUF tests: a reference model's
config as `<arch>.*` metadata, its tensors under llama.cpp's names (Llama's q/k rows permuted for llama.cpp's
rotary layout), optionally quantized with the gguf package, and a tokenizer as `tokenizer.ggml.*` metadata."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# a Hugging Face module name (after `model.layers.N.`) -> llama.cpp's tensor name (after `blk.N.`)
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# token types of llama.cpp's vocabularies
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def gguf_name(hf_name: str) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.{suffix}"


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: rotary halves (HF) -> interleaved pairs (GGML) within each head's rows."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(path: Path, model, arch: str, tensor_type: str = "F32", tokenizer: dict | None = None,
               name: str = "tiny", skip_quant: tuple[str, ...] = ("token_embd", "norm")) -> Path:
    """Write `model` (a reference *ForCausalLM) as a GGUF of architecture `arch` with 2-D weights stored as
    `tensor_type` (F32, F16, BF16, Q8_0, Q4_0); names containing an entry of `skip_quant` stay F32."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)
    for key, value in (tokenizer or {}).items():
        _add_value(w, key, value)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = c.num_attention_heads if ".q_proj." in hf_name else c.num_key_value_heads
            data = permute(data, heads)
        target = gguf_name(hf_name)
        if data.ndim == 2 and not any(s in target for s in skip_quant) and tensor_type != "F32":
            w.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(target, data)
    return save(w, path)


def save(writer, path: Path) -> Path:
    """Write a filled `gguf.GGUFWriter` out (header, metadata, tensors) and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_value(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif value and isinstance(value[0], float):
        w.add_array(key, [float(v) for v in value])
    else:
        w.add_array(key, list(value))


def truncated_bpe(tokenizer_json: Path, keep: int, out: Path) -> Path:
    """A byte-level BPE tokenizer.json cut to its first `keep` tokens (and the merges among them), its added tokens
    renumbered after them: the same pipeline on a vocabulary small enough for the reference's slow GGUF reader."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = {t: i for t, i in data["model"]["vocab"].items() if i < keep}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in merges if all(p in vocab for p in (*m.split(" "), m.replace(" ", "")))]
    for offset, token in enumerate(sorted(data["added_tokens"], key=lambda t: t["id"])):
        token["id"] = keep + offset
    data["post_processor"] = None
    out.write_text(json.dumps(data), encoding="utf-8")
    return out


def llama3_tokenizer_metadata(tokenizer_json: Path) -> dict:
    """A byte-level BPE tokenizer.json (Llama 3's) as llama.cpp's `gpt2` vocabulary: tokens by id, merges, types."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    added = {t["id"]: t for t in data["added_tokens"]}
    for index, token in added.items():
        vocab[token["content"]] = index
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    types = [CONTROL if i in added and added[i]["special"] else USER_DEFINED if i in added else NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": vocab["<|begin_of_text|>"],
            "tokenizer.ggml.eos_token_id": vocab["<|end_of_text|>"], "tokenizer.ggml.add_bos_token": True}


def sentencepiece_metadata(model_file: Path) -> dict:
    """A SentencePiece BPE model (llama-style) as llama.cpp's `llama` vocabulary: pieces, scores, types."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                     else USER_DEFINED if sp.is_unused(i) else NORMAL)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
