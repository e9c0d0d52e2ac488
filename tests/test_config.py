"""Configs: aliases, unknown keys kept, overrides, labels, AutoConfig dispatch and its errors."""
from __future__ import annotations

import copy
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
    with pytest.raises(ValueError, match="made-up.*supported types: bert, .*gpt2, .*llama"):
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


# -- field types ----------------------------------------------------------------------------------------------------
FAMILY_CONFIGS = ["BertConfig", "GPT2Config", "LlamaConfig", "MistralConfig", "Qwen2Config", "ViTConfig", "GemmaConfig",
                  "Gemma2Config", "Gemma3TextConfig", "Phi3Config", "PhiConfig", "GPTNeoXConfig"]
# fields loom type-checks that the reference's config class does not declare (it takes any value there)
CHECKED_BY_LOOM_ONLY = {
    "LlamaConfig": {"rope_theta"},  # folded into rope_parameters by the reference; a non-number fails its model
    "MistralConfig": {"rope_theta", "attention_bias", "mlp_bias", "pretraining_tp"},  # loom's variants inherit Llama's
    "Qwen2Config": {"rope_theta", "attention_bias", "mlp_bias", "pretraining_tp", "head_dim"},
    "ViTConfig": {"tie_word_embeddings"},
    "GemmaConfig": {"rope_theta"},
    "Gemma2Config": {"rope_theta"},
    "Gemma3TextConfig": {"rope_theta", "rope_local_base_freq", "sliding_window_pattern"},  # legacy keys, folded in
    # Phi-3 and Phi inherit Llama's; their references read partial_rotary_factor as a plain keyword
    "Phi3Config": {"rope_theta", "head_dim", "pretraining_tp", "partial_rotary_factor"},
    "PhiConfig": {"rope_theta", "head_dim", "pretraining_tp", "partial_rotary_factor"},
    "GPTNeoXConfig": {"rotary_pct", "rotary_emb_base"},  # legacy names the reference folds into rope_parameters
}


def _write_config(directory, data):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("key,value,kind", [("rms_norm_eps", "abc", "a string"), ("hidden_size", "64", "a string"),
                                            ("hidden_size", 64.0, "a float"), ("num_hidden_layers", True, "a bool"),
                                            ("rope_scaling", "linear", "a string"), ("eos_token_id", ["2"], "a list")])
def test_wrongly_typed_field_is_refused_at_load_naming_field_and_file(tmp_path, key, value, kind):
    """Before: rms_norm_eps "abc" loaded and failed in the first forward (ctypes.ArgumentError), hidden_size "64" inside
    torch.empty."""
    import re

    from loom.configuration import ConfigFieldError

    raw = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
           "intermediate_size": 64, "vocab_size": 50, key: value}
    path = _write_config(tmp_path, raw)
    where = re.escape(f"{path / 'config.json'}: LlamaConfig: {key}={value!r} is ") + f"{kind}.*but {key} must be"
    for load in (loom.AutoConfig.from_pretrained, loom.LlamaConfig.from_pretrained,
                 loom.AutoModelForCausalLM.from_pretrained,
                 lambda p: loom.LlamaConfig.from_json_file(p / "config.json")):
        with pytest.raises(ConfigFieldError, match=where):
            load(path)
    with pytest.raises(ConfigFieldError, match=f"^LlamaConfig: {key}="):  # a keyword, not the file, is to blame
        loom.AutoConfig.from_pretrained(_write_config(tmp_path / "ok", {**raw, key: 1}), **{key: value})
    with pytest.raises(ConfigFieldError, match=f"^LlamaConfig: {key}="):
        loom.LlamaConfig(**{key: value})


def test_field_types_take_what_the_reference_takes():
    """Ints for floats, null where a field is optional, lists of ids for eos, lists for ViT sizes."""
    c = loom.LlamaConfig(rms_norm_eps=1, initializer_range=0, num_key_value_heads=None, eos_token_id=[1, 2],
                         rope_scaling=None, pad_token_id=None, attention_dropout=None, head_dim=None)
    assert c.rms_norm_eps == 1 and c.num_key_value_heads == c.num_attention_heads and c.eos_token_id == [1, 2]
    assert loom.ViTConfig(image_size=[32, 32], patch_size=(8, 8)).image_size == [32, 32]
    assert loom.MistralConfig(sliding_window=None).sliding_window is None
    assert loom.BertConfig(classifier_dropout=0).classifier_dropout == 0


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_config_types_refused_only_where_the_reference_refuses(name):
    """Every checked field with values of each JSON type: where loom refuses a value, the reference's config class
    refuses it too, except for the fields the reference does not declare (listed, so a new one is noticed)."""
    import transformers

    from loom.configuration import ConfigFieldError

    ours, ref = getattr(loom, name), getattr(transformers, name)
    declared = {k for klass in ref.__mro__ for k in getattr(klass, "__annotations__", {})}
    if "rope_parameters" in declared:
        declared.add("rope_scaling")  # the legacy name, checked as rope_parameters
    checked = set(ours.defaults) | set(ours.field_types)
    assert checked - declared == CHECKED_BY_LOOM_ONLY.get(name, set())
    stricter = []
    for key in sorted(checked & declared):
        for value in (None, 3, 0.5, True, "abc", [1, 2], {"a": 1}):
            try:
                ours(**{key: copy.deepcopy(value)})
            except ConfigFieldError as e:
                assert f"{key}=" in str(e)
                try:
                    ref(**{key: copy.deepcopy(value)})
                    stricter.append((key, value))
                except Exception:  # noqa: BLE001 - any refusal of the reference will do
                    pass
    assert stricter == []


REAL_CONFIGS = {  # the type-relevant fields of real hub configs (facts from the published config.json files)
    "llama-2": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
                "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
                "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
                "num_key_value_heads": 32, "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
                "vocab_size": 32000},
    "llama-3.1": {"model_type": "llama", "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
                  "eos_token_id": [128001, 128008, 128009], "hidden_size": 4096, "intermediate_size": 14336,
                  "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
                  "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                  "rope_theta": 500000.0, "torch_dtype": "bfloat16", "vocab_size": 128256},
    "mistral-v0.2": {"model_type": "mistral", "bos_token_id": 1, "eos_token_id": 2, "hidden_size": 4096,
                     "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
                     "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                     "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 32000},
    "qwen2.5": {"model_type": "qwen2", "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
                "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
                "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
                "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 32768,
                "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936},
    "gpt2": {"model_type": "gpt2", "activation_function": "gelu_new", "attn_pdrop": 0.1, "bos_token_id": 50256,
             "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
             "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_inner": None, "n_layer": 12, "n_positions": 1024,
             "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
             "summary_proj_to_labels": True,
             "summary_type": "cls_index", "summary_use_proj": True,
             "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257},
    "bert-base": {"model_type": "bert", "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
                  "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
                  "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
                  "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
                  "position_embedding_type": "absolute", "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522},
    "vit-base": {"model_type": "vit", "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
                 "hidden_dropout_prob": 0.0, "hidden_size": 768, "image_size": 224, "initializer_range": 0.02,
                 "intermediate_size": 3072, "layer_norm_eps": 1e-12, "num_attention_heads": 12, "num_channels": 3,
                 "num_hidden_layers": 12, "patch_size": 16, "qkv_bias": True},
}


def test_real_fixture_and_default_configs_still_load(tmp_path, minilm_dir):
    """The configs users have: real hub configs, the real MiniLM asset, the reference's defaults for every family and
    the tiny configs the tests build; the reference loads each, so loom must too."""
    import transformers

    from loomtest import TINY

    dirs = [minilm_dir] + [_write_config(tmp_path / name, data) for name, data in REAL_CONFIGS.items()]
    for model_type in ("bert", "gpt2", "llama", "mistral", "qwen2", "vit", "phi3", "phi", "gpt_neox"):
        transformers.AutoConfig.for_model(model_type).save_pretrained(tmp_path / f"default-{model_type}")
        dirs.append(tmp_path / f"default-{model_type}")
        if model_type in TINY:
            transformers.AutoConfig.for_model(model_type, **{**TINY[model_type], "pad_token_id": 0}).save_pretrained(
                tmp_path / f"tiny-{model_type}")
            dirs.append(tmp_path / f"tiny-{model_type}")
    for path in dirs:
        ref = transformers.AutoConfig.from_pretrained(path)
        ours = loom.AutoConfig.from_pretrained(path)
        assert ours.model_type == ref.model_type and ours.hidden_size == ref.hidden_size, path


TEXT_CONFIG_CASES = {  # extra config keys -> what get_text_config finds, in loom and in the reference
    "flat": {},
    "nested text_config": {"text_config": {"hidden_size": 8}},
    "one per end": {"text_config": {"hidden_size": 8}, "text_encoder": {"hidden_size": 16}},
    "flat encoder-decoder": {"is_encoder_decoder": True, "decoder_layers": 3, "encoder_layers": 5,
                             "decoder_attention_heads": 2, "decoder_ffn_dim": 7, "encoder_ffn_dim": 9},
}


@pytest.mark.parametrize("case", TEXT_CONFIG_CASES)
@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_get_text_config_and_sub_configs_as_the_reference(model_type, case):
    """sentence-transformers' trainer calls model.config.get_text_config(); composite configs nest theirs."""
    import transformers

    from loomtest import TINY

    kwargs = {**TINY[model_type], **TEXT_CONFIG_CASES[case]}
    ours, ref = loom.AutoConfig.for_model(model_type, **kwargs), transformers.AutoConfig.for_model(model_type, **kwargs)
    assert type(ours).sub_configs == type(ref).sub_configs == {}
    for end in ({}, {"decoder": True}, {"encoder": True}, {"decoder": True, "encoder": True}):
        try:
            want = ref.get_text_config(**end)
        except ValueError:
            with pytest.raises(ValueError, match=r"get_text_config: .*several text configs \['text_encoder', "
                                                 r"'text_config'\].*config\.text_encoder"):
                ours.get_text_config(**end)
            continue
        got = ours.get_text_config(**end)
        if want is ref:
            assert got is ours, end
        elif isinstance(want, dict):
            assert got == want, end
        else:  # one end of a flat encoder-decoder config: a renamed copy
            assert got is not ours and ours.num_hidden_layers == TINY[model_type]["num_hidden_layers"]
            picked = {k: v for k, v in want.to_dict().items() if k in kwargs or k in ("num_hidden_layers",
                                                                                      "num_attention_heads")}
            assert {k: got.to_dict().get(k) for k in picked} == picked, end
            assert not any(k.startswith(("decoder_" if end.get("decoder") else "encoder_")) for k in got.to_dict())


def test_pretrained_config_has_the_5x_spelling_too():
    import transformers

    assert loom.PreTrainedConfig is loom.PretrainedConfig is PretrainedConfig
    assert transformers.PreTrainedConfig is transformers.PretrainedConfig  # the reference keeps both names as one
    assert isinstance(loom.BertConfig(), loom.PreTrainedConfig)


def test_label2id_values_are_kept_as_given_like_the_reference():
    import transformers

    ours = loom.BertConfig(id2label={0: "label"}, label2id={"label": "0"})
    ref = transformers.BertConfig(id2label={0: "label"}, label2id={"label": "0"})
    assert ours.label2id == ref.label2id == {"label": "0"}
    assert loom.BertConfig(id2label={"0": "a", "1": "b"}).id2label == {0: "a", 1: "b"}
