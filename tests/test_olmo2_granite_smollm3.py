"""What sets OLMo 2, Granite and SmolLM3 apart, against the reference beyond the shared family tests: Granite's four
multipliers one at a time (each must change the logits), SmolLM3's NoPE layer choice and its sliding layers, OLMo 2's
norm in bf16, checkpoint key names, and the config errors for bad no_rope_layers / layer_types / hidden_act."""
from __future__ import annotations

import json

import pytest
import torch

import loom
from loom.configuration import ConfigFieldError
from loomtest import TINY, check_padded_and_generate, reference_checkpoint


def _ids(B=2, T=14, seed=1):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


def _check_padded_and_generate(ours, ref, T=14):
    """Padded-batch logits within 1e-4 of the reference and greedy generate token-identical."""
    ids = _ids(T=T)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    check_padded_and_generate(ours, ref, ids, mask)


GRANITE_DEFAULTS = dict(embedding_multiplier=1.0, residual_multiplier=1.0, attention_multiplier=8 ** -0.5,
                        logits_scaling=1.0)


@pytest.mark.parametrize("key,value", [("embedding_multiplier", 12.0), ("residual_multiplier", 0.22),
                                       ("attention_multiplier", 0.05), ("logits_scaling", 8.0)])
def test_granite_each_multiplier_matches_reference(tmp_path_factory, key, value):
    """One multiplier away from its neutral value at a time, so a swapped or dropped multiplier cannot hide."""
    base = {**GRANITE_DEFAULTS, key: value}
    path, ref = reference_checkpoint(tmp_path_factory, "granite", "GraniteForCausalLM", pad_token_id=0, **base)
    ours = loom.GraniteForCausalLM.from_pretrained(path)
    _check_padded_and_generate(ours, ref)
    neutral = loom.GraniteForCausalLM.from_pretrained(path, **GRANITE_DEFAULTS)  # same weights, multiplier neutral
    with torch.no_grad():
        assert (neutral(_ids()).logits - ref(_ids()).logits).abs().max() > 1e-3, f"{key} changed nothing"


def test_granite_scales_caller_embeddings_as_reference(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "granite", "GraniteForCausalLM", pad_token_id=0)
    ours = loom.GraniteForCausalLM.from_pretrained(path)
    assert ours.config.embedding_multiplier == 12.0  # TINY's
    embeds = ref.get_input_embeddings()(_ids())
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.model(inputs_embeds=embeds).last_hidden_state,
                                   ours.model(_ids()).last_hidden_state, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("settings", [
    dict(num_hidden_layers=8, no_rope_layer_interval=3),
    dict(num_hidden_layers=8, no_rope_layer_interval=4, use_sliding_window=True, sliding_window=5),
    dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=None),
    dict(num_hidden_layers=4, use_sliding_window=False, sliding_window=5),
    dict(num_hidden_layers=3, no_rope_layers=[0, 1, 1, 0, 0], use_sliding_window=True, sliding_window=5),
])
def test_smollm3_nope_and_window_layers_as_reference_config(settings):
    import transformers

    ours, ref = loom.SmolLM3Config(**settings), transformers.SmolLM3Config(**settings)
    assert ours.no_rope_layers == ref.no_rope_layers and ours.layer_types == ref.layer_types
    assert ours.rope_parameters == ref.rope_parameters  # rope_theta 2e6 by default


@pytest.mark.parametrize("model_type,cls", [("olmo2", "Olmo2ForCausalLM"), ("granite", "GraniteForCausalLM"),
                                            ("smollm3", "SmolLM3ForCausalLM")])
def test_yarn_rope_beyond_original_context(tmp_path_factory, model_type, cls):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, rope_parameters=rope)
    ours = getattr(loom, cls).from_pretrained(path)
    ids = _ids(T=40)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra", [
    dict(no_rope_layers=[0, 1, 1], use_sliding_window=True, sliding_window=3),  # NoPE first layer, windowed
    dict(no_rope_layers=[1, 0, 1, 1], layer_types=["full_attention", "full_attention", "sliding_attention"],
         sliding_window=3, attention_bias=False, mlp_bias=False),  # longer list; window on a RoPE layer
])
def test_smollm3_nope_layers_match_reference(tmp_path_factory, extra):
    path, ref = reference_checkpoint(tmp_path_factory, "smollm3", "SmolLM3ForCausalLM", num_hidden_layers=3,
                                     **extra)
    ours = loom.SmolLM3ForCausalLM.from_pretrained(path)
    assert [layer.self_attn.use_rope for layer in ours.model.layers] == [bool(v) for v in extra["no_rope_layers"][:3]]
    assert ours.model.windows == [3 if t == "sliding_attention" else None for t in ref.config.layer_types]
    _check_padded_and_generate(ours, ref)
    # the NoPE choice matters: the same weights with RoPE everywhere give other logits
    all_rope = loom.SmolLM3ForCausalLM.from_pretrained(path, no_rope_layers=[1, 1, 1])
    with torch.no_grad():
        assert (all_rope(_ids()).logits - ref(_ids()).logits).abs().max() > 1e-3


def test_olmo2_norm_in_bf16_matches_reference():
    """OLMo 2 multiplies the norm weight in fp32 before rounding (Llama rounds first); the results differ in bf16."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm as RefNorm

    from loom.models.olmo2 import Olmo2RMSNorm

    torch.manual_seed(0)
    x = torch.randn(4, 7, 64).to(torch.bfloat16)
    ours, ref = Olmo2RMSNorm(64, 1e-5), RefNorm(64, 1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(64) * 3)
        ours.weight.copy_(ref.weight)
        ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("model_type,cls", [("olmo2", "Olmo2ForCausalLM"), ("granite", "GraniteForCausalLM"),
                                            ("smollm3", "SmolLM3ForCausalLM"),
                                            ("olmo2", "Olmo2ForSequenceClassification")])
def test_checkpoint_keys_are_the_references(tmp_path_factory, model_type, cls):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls)
    assert set(getattr(loom, cls).from_pretrained(path).state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("settings,key,says", [
    (dict(no_rope_layers=[1, 0]), "no_rope_layers", "each of the num_hidden_layers=3"),  # 3 layers
    (dict(no_rope_layers=[1, 2, 1]), "no_rope_layers", r"1 \(RoPE\) or 0 \(NoPE\)"),
    (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=4), "layer_types", "=3 layers"),
    (dict(layer_types=["full_attention", "local", "full_attention"], sliding_window=4), "layer_types",
     "full_attention, sliding_attention"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"]), "layer_types",
     "sliding_window is null"),
])
def test_smollm3_bad_layer_lists_name_the_key(tmp_path, settings, key, says):
    with pytest.raises(ConfigFieldError, match=f"{key}.*{says}") as err:
        loom.SmolLM3Config(num_hidden_layers=3, **settings)
    assert err.value.field == key
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "smollm3", "num_hidden_layers": 3, **settings}))
    with pytest.raises(ConfigFieldError, match=key) as err:
        loom.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


@pytest.mark.parametrize("model_type", ["olmo2", "granite", "smollm3"])
def test_unsupported_hidden_act_names_key_and_file(tmp_path, model_type):
    config = {**TINY[model_type], "model_type": model_type, "hidden_act": "xielu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigFieldError, match=r"hidden_act='xielu' is not supported.*silu") as err:
        loom.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
