"""Every RoPE type against the reference, at positions beyond the original context, in one forward and in cached
greedy decoding (dynamic and longrope change their frequencies with the length reached); bad rope settings."""
from __future__ import annotations

import pytest
import torch

import loom
from loomtest import reference_checkpoint

HEAD_DIM = 8  # TINY llama: hidden 32, 4 heads
ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6],
                 "long_factor": [1.0, 2.5, 7.0, 19.0], "original_max_position_embeddings": 16},
}


def _ids(B=2, T=12, seed=1):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(ROPES))
def pair(request, tmp_path_factory):
    # max_position_embeddings=24 so that dynamic grows within the test's lengths
    path, ref = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM", max_position_embeddings=24,
                                     rope_parameters={**ROPES[request.param], "rope_theta": 10000.0})
    return loom.LlamaForCausalLM.from_pretrained(path), ref


def test_forward_beyond_original_context(pair):
    ours, ref = pair
    for T in (12, 40):  # under and over the original/maximum length (dynamic resets, longrope switches)
        ids = _ids(T=T)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_greedy_decode_across_the_threshold(pair):
    ours, ref = pair
    ids = _ids(B=1, T=10, seed=2)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = ours.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
        b = ref.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
        assert a.sequences.tolist() == b.sequences.tolist()
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=1e-4)
        batch = _ids(B=2, T=10, seed=3)
        mask = torch.ones_like(batch)
        mask[0, :3] = 0
        assert ours.generate(batch, attention_mask=mask, **kw).tolist() == \
            ref.generate(batch, attention_mask=mask, **kw).tolist()


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "su"}, "rope_type"),
    ({"rope_type": "yarn"}, None),  # factor falls back to max / original length: valid
    ({"rope_type": "dynamic"}, "lacks factor"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 4}, "lacks long_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}, "needs 4"),
])
def test_bad_rope_settings_name_the_key(rope, message):
    config = loom.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=48, rope_parameters={**rope, "rope_theta": 10000.0})
    if message is None:
        loom.LlamaForCausalLM(config)
        return
    with pytest.raises(ValueError, match="rope_parameters") as e:
        loom.LlamaForCausalLM(config)
    assert message in str(e.value)


def test_unsupported_settings_name_the_checkpoint(tmp_path):
    import json

    loom.LlamaForCausalLM(loom.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=48)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in (("rope_scaling", {"rope_type": "su", "factor": 2.0}, "rope_type"),
                                ("hidden_act", "swiglu", "hidden_act")):
        (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": None, key: value}))
        with pytest.raises(ValueError, match=message) as e:
            loom.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert str(tmp_path) in str(e.value)
