"""Phi-3, Phi and GPT-NeoX beyond what tests/test_families.py and tests/test_model_parity.py check for every family:
the settings their tiny configs leave at one value (Phi-3's longrope across original_max_position_embeddings, where
the reference's generate restarts its cache; legacy rope names; Phi without qk_layernorm from a Phi-2-style config;
GPT-NeoX's sequential residual; a Pythia-style config and checkpoint), the tensor-parallel plans, and the errors for
settings these families do not take."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import loom
from loom.auto import model_table
from loom.distributed import resolve_plan
from loomtest import TINY, reference_checkpoint

FAMILIES = ("phi3", "phi", "gpt_neox")


def _ids(B=2, T=12, seed=1):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


def _padded(T=12, seed=1):
    ids, mask = _ids(T=T, seed=seed), torch.ones(2, T, dtype=torch.long)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def _edit_config(path, **changes) -> None:
    """Rewrite config.json: a value of None removes the key."""
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


def assert_matches_reference(ours, ref, T=14, max_new_tokens=8):
    """Padded-batch logits within 1e-4, cached decode equal to the full forward, greedy and beam generate (one prompt
    and a left-padded batch) token-identical to the reference."""
    ids, mask = _padded(T)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[0, 3:], b[0, 3:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)
        out = ours(ids[1:, :T - 3], use_cache=True)
        steps = [out.logits]
        for t in range(T - 3, T):
            out = ours(ids[1:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), a[1:], atol=1e-5, rtol=1e-5)
        for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=3, length_penalty=1.0)):
            kw.update(max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)
            assert ours.generate(ids[1:], **kw).tolist() == ref.generate(ids[1:], **kw).tolist(), kw
            assert ours.generate(ids, attention_mask=mask, **kw).tolist() == \
                ref.generate(ids, attention_mask=mask, **kw).tolist(), kw


# -- Phi-3 ------------------------------------------------------------------------------------------------------------
# TINY phi3: head_dim 8, partial_rotary_factor 0.5 -> 4 rotary dims -> 2 factors; switch at 16 of 64 positions
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.3], "long_factor": [1.7, 6.0], "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "phi3", "Phi3ForCausalLM", rope_parameters=dict(LONGROPE),
                                     original_max_position_embeddings=16)
    return path, ref, loom.Phi3ForCausalLM.from_pretrained(path)


def test_phi3_longrope_generate_restarts_its_cache_like_the_reference(phi3_longrope):
    """The prompt (10 tokens) is under original_max_position_embeddings=16 and generation goes past it: the
    reference re-reads the whole sequence with the long factors at that step; loom must do the same (with a
    dynamic or a static cache, greedy or beam, one prompt or a padded batch) to stay token-identical."""
    _, ref, ours = phi3_longrope
    assert ours.model.rotary_emb.params["rope_type"] == "longrope"
    ids, mask = _padded(T=10, seed=2)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = ours.generate(ids[1:], return_dict_in_generate=True, output_logits=True, **kw)
        b = ref.generate(ids[1:], return_dict_in_generate=True, output_logits=True, **kw)
        assert a.sequences.tolist() == b.sequences.tolist()
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=1e-4)
        want = ref.generate(ids, attention_mask=mask, **kw).tolist()
        assert ours.generate(ids, attention_mask=mask, **kw).tolist() == want
        assert ours.generate(ids, attention_mask=mask, cache_implementation="static", **kw).tolist() == want
        beams = dict(kw, num_beams=3, length_penalty=1.0)
        assert ours.generate(ids, attention_mask=mask, **beams).tolist() == \
            ref.generate(ids, attention_mask=mask, **beams).tolist()


def test_phi3_legacy_su_rope_scaling_is_longrope(phi3_longrope, tmp_path):
    """Early Phi-3 configs name longrope 'su' in rope_scaling, beside a top-level rope_theta."""
    path, ref, _ = phi3_longrope
    for name in ("model.safetensors", "config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    legacy = {k: v for k, v in LONGROPE.items() if k not in ("rope_type", "rope_theta")}
    _edit_config(tmp_path, rope_parameters=None, rope_scaling={**legacy, "type": "su"}, rope_theta=10000.0)
    ours = loom.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_parameters["rope_type"] == "longrope"
    with torch.no_grad():
        for T in (12, 40):  # short factors, then long ones
            ids = _ids(T=T)
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_phi3_without_sliding_window_or_partial_rotary(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "phi3", "Phi3ForCausalLM", sliding_window=None,
                                     partial_rotary_factor=1.0, num_key_value_heads=4, tie_word_embeddings=True)
    ours = loom.Phi3ForCausalLM.from_pretrained(path)
    assert ours.model.windows == [None, None] and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert_matches_reference(ours, ref)


# -- Phi -------------------------------------------------------------------------------------------------------------
def test_phi2_style_config_without_qk_layernorm(tmp_path_factory):
    """Phi-2's config.json: top-level partial_rotary_factor (0.4) and rope_theta, no rope_parameters; no q/k
    LayerNorms. head_dim 10 -> 4 rotary dims."""
    path, ref = reference_checkpoint(tmp_path_factory, "phi", "PhiForCausalLM", hidden_size=40,
                                     num_key_value_heads=4, qk_layernorm=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                      "partial_rotary_factor": 0.4})
    _edit_config(path, rope_parameters=None, rope_scaling=None, partial_rotary_factor=0.4, rope_theta=500.0)
    ours = loom.PhiForCausalLM.from_pretrained(path)
    assert ours.model.rotary_emb.dim == 4 and not hasattr(ours.model.layers[0].self_attn, "q_layernorm")
    assert ours.lm_head.bias is not None
    assert_matches_reference(ours, ref)


# -- GPT-NeoX --------------------------------------------------------------------------------------------------------
def test_gpt_neox_sequential_residual_with_scaled_rope(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "gpt_neox", "GPTNeoXForCausalLM", use_parallel_residual=False,
                                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5})
    ours = loom.GPTNeoXForCausalLM.from_pretrained(path)
    assert not ours.gpt_neox.layers[0].use_parallel_residual
    assert_matches_reference(ours, ref)


def test_pythia_style_checkpoint_loads_quietly(tmp_path_factory, caplog):
    """Pythia's config.json has rotary_pct / rotary_emb_base instead of rope_parameters, and its safetensors carry
    the old causal-mask and rotary buffers; they load without a warning and give the reference's logits."""
    path, ref = reference_checkpoint(tmp_path_factory, "gpt_neox", "GPTNeoXForCausalLM",
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                      "partial_rotary_factor": 0.5})
    _edit_config(path, rope_parameters=None, rotary_pct=0.5, rotary_emb_base=1000)
    tensors = load_file(path / "model.safetensors")
    assert "embed_out.weight" in tensors  # the checkpoint's name for the LM head, which loom keeps
    for i in range(2):
        prefix = f"gpt_neox.layers.{i}.attention."
        tensors[prefix + "bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
        tensors[prefix + "masked_bias"] = torch.tensor(-1e9)
        tensors[prefix + "rotary_emb.inv_freq"] = torch.ones(2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="loom"):
        ours = loom.AutoModelForCausalLM.from_pretrained(path)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert ours.gpt_neox.rotary_emb.dim == 4 and ours.gpt_neox.rotary_emb.params["rope_theta"] == 1000
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


# -- tensor parallel and bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_tp_plan_entry_names_a_module(model_type):
    """A plan pattern that matches nothing leaves its module replicated without a word; the 2-process test in
    test_families.py would still pass, so each entry is checked here."""
    config_class, heads = model_table()[model_type]
    for head in ("causal-lm", "base"):
        model = heads[head](config_class(**TINY[model_type]))
        for pattern, style in model._tp_plan.items():
            if head == "base" and not pattern.startswith(model.base_model_prefix + "."):
                continue  # the head's own modules
            assert resolve_plan(model, {pattern: style}), pattern  # raises when no module matches


@pytest.mark.parametrize("model_type", FAMILIES)
def test_unsupported_hidden_act_names_key_and_checkpoint(model_type, tmp_path_factory):
    cls = model_table()[model_type][1]["causal-lm"].__name__
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls)
    _edit_config(path, hidden_act="swiglu")
    with pytest.raises(ValueError, match="hidden_act='swiglu'") as e:
        loom.AutoModelForCausalLM.from_pretrained(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_phi3_refuses_other_rope_types_naming_the_key(key, tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "phi3", "Phi3ForCausalLM")
    _edit_config(path, **{"rope_parameters": None, key: {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match=rf"{key}\['rope_type'\]='linear' is not supported by Phi-3") as e:
        loom.AutoModelForCausalLM.from_pretrained(path)
    assert str(path) in str(e.value) and "'longrope'" in str(e.value)


def test_gpt_neox_head_split_must_be_even():
    with pytest.raises(ValueError, match="hidden_size=30 is not a multiple of num_attention_heads=4"):
        loom.GPTNeoXConfig(hidden_size=30, num_attention_heads=4)
