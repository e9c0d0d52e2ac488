"""Configs: aliases, unknown keys kept, overrides, labels, AutoConfig dispatch and its errors."""
from __future__ import annotations

import json

import pytest

import loom
from loom.configuration import PretrainedConfig


def test_gpt2_legacy_aliases_and_roundtrip(tmp_path):
    c = loom.GPT2Config(n_embd=48, n_layer=3, n_head=4, n_positions=128)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.max_position_embeddings) == (48, 3, 4, 128)
    c2 = loom.GPT2Config(hidden_size=64)
    assert c2.n_embd == 64
    c.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["n_embd"] == 48 and data["model_type"] == "gpt2"
    assert loom.AutoConfig.from_pretrained(tmp_path) == c


def test_unknown_keys_kept_and_overrides(tmp_path):
    raw = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
           "intermediate_size": 64, "vocab_size": 50, "my_custom_key": {"nested": [1, 2]}, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = loom.AutoConfig.from_pretrained(tmp_path, num_labels=3, rms_norm_eps=1e-5)
    assert isinstance(c, loom.LlamaConfig)
    assert c.my_custom_key == {"nested": [1, 2]}
    assert c.num_labels == 3 and c.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert c.rms_norm_eps == 1e-5 and c.dtype == "bfloat16" and c.torch_dtype == "bfloat16"
    out = tmp_path / "out"
    c.save_pretrained(out)
    again = json.loads((out / "config.json").read_text())
    assert again["my_custom_key"] == {"nested": [1, 2]} and again["dtype"] == "bfloat16"
    assert again["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}


def test_reference_reads_our_config_and_back(tmp_path):
    import transformers

    c = loom.BertConfig(hidden_size=64, num_attention_heads=4, id2label={0: "neg", 1: "pos"})
    c.save_pretrained(tmp_path)
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ref.hidden_size == 64 and ref.id2label == {0: "neg", 1: "pos"} and ref.label2id == {"neg": 0, "pos": 1}
    ref.save_pretrained(tmp_path / "r")
    assert loom.AutoConfig.from_pretrained(tmp_path / "r").id2label == {0: "neg", 1: "pos"}


def test_rope_legacy_keys_become_rope_parameters():
    from loom.models.rope import rope_parameters

    c = loom.LlamaConfig(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    p = rope_parameters(c)
    assert p["rope_type"] == "linear" and p["rope_theta"] == 500000.0 and p["factor"] == 2.0


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "made-up"}))
    with pytest.raises(ValueError, match="made-up.*supported types: bert, gpt2, llama"):
        loom.AutoConfig.from_pretrained(tmp_path)


def test_missing_and_invalid_config(tmp_path):
    with pytest.raises(OSError, match="has no file config.json"):
        loom.AutoConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="config.json is not valid JSON"):
        loom.AutoConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(OSError, match="must hold a JSON object"):
        PretrainedConfig.from_pretrained(tmp_path)


def test_num_labels_conflict():
    with pytest.raises(ValueError, match="num_labels=3 does not match id2label"):
        loom.BertConfig(num_labels=3, id2label={0: "a", 1: "b"})
