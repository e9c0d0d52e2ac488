"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) beyond tests/test_families.py: router logits and the
load-balancing loss against the reference, router jitter in training, each family's layer rules (windows, dense
layers, biases, router normalisation), a decode step that runs only the chosen experts, the tensor-parallel plan,
routers left out of quantization, and the errors for expert counts that do not fit the checkpoint."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import loom
from loom.distributed.tensor_parallel import resolve_plan
from loom.kernels import is_plain_linear, policy
from loom.models.moe import Router, SparseMoE
from loom.quantization import WeightOnlyConfig
from loomtest import TINY, check_padded_and_generate, kernels_on, reference_checkpoint

HEADS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts"}


def _ids(B=2, T=12, seed=1):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


def _padded(T=12):
    ids, mask = _ids(T=T), torch.ones(2, T, dtype=torch.long)
    ids[0, :4], mask[0, :4] = 0, 0
    return ids, mask


def _blocks(model) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


@pytest.fixture(scope="module", params=sorted(HEADS))
def family(request, tmp_path_factory):
    model_type = request.param
    path, ref = reference_checkpoint(tmp_path_factory, model_type, HEADS[model_type], pad_token_id=0)
    return model_type, path, ref, getattr(loom, HEADS[model_type]).from_pretrained(path)


def test_router_logits_and_aux_loss_match_reference(family):
    import transformers

    model_type, path, ref, ours = family
    ids, mask = _padded()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        b = ref(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        plain = ours(ids, attention_mask=mask, labels=labels)
        base = ours.model(ids, attention_mask=mask, output_router_logits=True).router_logits
    assert plain.aux_loss is None and plain.router_logits is None
    assert len(a.router_logits) == len(b.router_logits) == len(_blocks(ours))
    for x, y, z in zip(a.router_logits, b.router_logits, base):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    coef = ours.config.router_aux_loss_coef
    torch.testing.assert_close(a.loss, plain.loss + coef * a.aux_loss, atol=1e-6, rtol=1e-6)
    # the same from config.json's output_router_logits; generate is unaffected by it
    ours_cfg = type(ours).from_pretrained(path, output_router_logits=True)
    ref_cfg = getattr(transformers, HEADS[model_type]).from_pretrained(path, output_router_logits=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours_cfg(ids, labels=labels).aux_loss, ref_cfg(ids, labels=labels).aux_loss,
                                   atol=1e-6, rtol=1e-6)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    assert ours_cfg.generate(ids, **kw).tolist() == ours.generate(ids, **kw).tolist()


def test_decode_step_runs_only_the_chosen_experts(family):
    _, _, _, ours = family
    calls = []
    hooks = [expert.register_forward_hook(lambda m, args, out, b=b, e=e: calls.append((b, e, args[0].shape[0])))
             for b, block in enumerate(_blocks(ours)) for e, expert in enumerate(block.experts)]
    try:
        ids = _ids(B=1, T=9)
        with torch.no_grad():
            out = ours(ids, use_cache=True)
            prefill, calls[:] = list(calls), []
            ours(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    top_k, blocks = ours.config.num_experts_per_tok, len(_blocks(ours))
    assert top_k < len(_blocks(ours)[0].experts)  # otherwise running every expert would pass too
    # decode: top_k experts per block, one row each
    assert Counter(b for b, _, _ in calls) == {b: top_k for b in range(blocks)}
    assert all(rows == 1 for _, _, rows in calls)
    # prefill: each expert runs at most once per block, on exactly the rows routed to it
    assert len({(b, e) for b, e, _ in prefill}) == len(prefill)
    assert all(sum(r for b2, _, r in prefill if b2 == b) == 9 * top_k for b in range(blocks))
    # the router is a kernel Linear too, so decode keeps loom's kernel thread hand-off where the kernels exist
    assert policy.decode_on_kernels(ours, 1) == kernels_on()


def test_router_jitter_in_training_matches_reference(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "mixtral", "MixtralForCausalLM", router_jitter_noise=0.2)
    ours = loom.MixtralForCausalLM.from_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        still = ours(ids).logits
        ref.train(), ours.train()
        torch.manual_seed(5)
        a = ours(ids).logits
        torch.manual_seed(5)
        b = ref(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - still).abs().max() > 1e-3  # the jitter changed the result


@pytest.mark.parametrize("model_type,extra,windows", [
    ("mixtral", dict(sliding_window=3), [3, 3]),
    # sliding on even layers below max_window_layers (0, 2); experts on every second layer (1, 3)
    ("qwen2_moe", dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=3, max_window_layers=3,
                       decoder_sparse_step=2, mlp_only_layers=[], qkv_bias=False, norm_topk_prob=True),
     [3, None, 3, None]),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=3, attention_bias=True, mlp_only_layers=[0],
                       norm_topk_prob=False), [3, 3]),
])
def test_layer_rules_match_reference(tmp_path_factory, model_type, extra, windows):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, HEADS[model_type], pad_token_id=0, **extra)
    config = json.loads((path / "config.json").read_text())
    config.pop("layer_types", None)  # as in older Hub configs: loom derives them by the family's rule
    (path / "config.json").write_text(json.dumps(config))
    ours, info = getattr(loom, HEADS[model_type]).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ours.model.windows == windows
    check_padded_and_generate(ours, ref, *_padded(T=14))


def test_router_weights_follow_each_family(family):
    """Mixtral renormalises the top-k weights and keeps them float32; Qwen renormalises with norm_topk_prob and
    casts them to the logits' dtype (the TINY Qwen3-MoE sets norm_topk_prob, Qwen2-MoE does not)."""
    model_type, path, _, _ = family
    model = getattr(loom, HEADS[model_type]).from_pretrained(path, dtype=torch.bfloat16)
    block = _blocks(model)[0]
    _, weights, chosen = block.route(torch.randn(5, model.config.hidden_size, dtype=torch.bfloat16))
    assert chosen.shape == (5, model.config.num_experts_per_tok)
    assert weights.dtype == (torch.float32 if model_type == "mixtral" else torch.bfloat16)
    sums = weights.float().sum(-1)
    if model_type == "qwen2_moe":
        assert (sums < 0.99).all()
    else:
        torch.testing.assert_close(sums, torch.ones(5), atol=1e-2, rtol=0)


def test_tp_plan_shards_experts_and_replicates_routers(family):
    model_type, _, _, ours = family
    plan = resolve_plan(ours)
    names = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
             "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[model_type]
    for block_name, block in ours.named_modules():
        if not isinstance(block, SparseMoE):
            continue
        assert block_name + ".gate" not in plan
        for e in range(len(block.experts)):
            assert [plan.get(f"{block_name}.experts.{e}.{n}") for n in names] == ["colwise", "colwise", "rowwise"]
        if model_type == "qwen2_moe":
            assert plan[f"{block_name}.shared_expert.down_proj"] == "rowwise"
            assert f"{block_name}.shared_expert_gate" not in plan
    if model_type == "qwen2_moe":  # its dense layer (mlp_only_layers)
        assert plan["model.layers.1.mlp.down_proj"] == "rowwise"


def test_quantization_keeps_routers_in_full_precision(family):
    _, path, _, _ = family
    q = loom.AutoModelForCausalLM.from_pretrained(path, quantization_config=WeightOnlyConfig(bits=8))
    for block in _blocks(q):
        assert type(block.gate) is Router and block.gate.weight.dtype == torch.float32
        assert not any(is_plain_linear(m) for m in block.experts.modules())  # the experts are quantized


def test_expert_counts_that_do_not_fit_name_the_config_key(family):
    model_type, path, _, _ = family
    key = EXPERTS_KEY[model_type]
    with pytest.raises(ValueError, match=rf"(?s)gate.weight: checkpoint \(4, 32\) vs model \(8, 32\).*The checkpoint "
                                         rf"has 4 experts where the config has {key}=8; set {key} to 4"):
        loom.AutoModelForCausalLM.from_pretrained(path, **{key: 8})
    with pytest.raises(ValueError, match=rf"{path}: config num_experts_per_tok=5 must be between 1 and {key}=4"):
        loom.AutoModelForCausalLM.from_pretrained(path, num_experts_per_tok=5)


def test_qwen3_moe_reads_the_hub_key_num_experts(tmp_path_factory):
    """The reference writes num_local_experts; Hub checkpoints (Qwen3-30B-A3B) say num_experts."""
    path, ref = reference_checkpoint(tmp_path_factory, "qwen3_moe", "Qwen3MoeForCausalLM")
    config = json.loads((path / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    (path / "config.json").write_text(json.dumps(config))
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    assert ours.config.num_local_experts == ours.config.num_experts == TINY["qwen3_moe"]["num_experts"]
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref(_ids()).logits, atol=1e-4, rtol=1e-4)


# the Hub's config.json of Mixtral-8x7B-v0.1, Qwen1.5-MoE-A2.7B and Qwen3-30B-A3B (bookkeeping keys left out)
HUB_CONFIGS = {
    "mixtral": dict(hidden_size=4096, intermediate_size=14336, max_position_embeddings=32768, num_attention_heads=32,
                    num_experts_per_tok=2, num_hidden_layers=32, num_key_value_heads=8, num_local_experts=8,
                    output_router_logits=False, rms_norm_eps=1e-05, rope_theta=1000000.0, router_aux_loss_coef=0.02,
                    sliding_window=None, tie_word_embeddings=False, vocab_size=32000, bos_token_id=1, eos_token_id=2),
    "qwen2_moe": dict(hidden_size=2048, intermediate_size=5632, max_position_embeddings=8192, max_window_layers=21,
                      num_attention_heads=16, num_hidden_layers=24, num_key_value_heads=16, rms_norm_eps=1e-06,
                      rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False, vocab_size=151936,
                      decoder_sparse_step=1, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                      num_experts_per_tok=4, num_experts=60, norm_topk_prob=False, router_aux_loss_coef=0.001,
                      bos_token_id=151643, eos_token_id=151643),
    "qwen3_moe": dict(attention_bias=False, decoder_sparse_step=1, head_dim=128, hidden_size=2048,
                      intermediate_size=6144, max_position_embeddings=40960, max_window_layers=48, mlp_only_layers=[],
                      moe_intermediate_size=768, norm_topk_prob=True, num_attention_heads=32, num_experts=128,
                      num_experts_per_tok=8, num_hidden_layers=48, num_key_value_heads=4, rms_norm_eps=1e-06,
                      rope_scaling=None, rope_theta=1000000.0, sliding_window=None, use_sliding_window=False,
                      vocab_size=151936, bos_token_id=151643, eos_token_id=151645),
}


@pytest.mark.parametrize("model_type", sorted(HUB_CONFIGS))
def test_hub_configs_read_as_the_reference_reads_them(tmp_path, model_type):
    import transformers

    (tmp_path / "config.json").write_text(json.dumps({**HUB_CONFIGS[model_type], "model_type": model_type}))
    ours, ref = loom.AutoConfig.from_pretrained(tmp_path), transformers.AutoConfig.from_pretrained(tmp_path)
    for key in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef", "num_key_value_heads",
                "mlp_only_layers", "norm_topk_prob", "layer_types", "decoder_sparse_step"):
        assert getattr(ours, key, None) == getattr(ref, key, None), key
    assert ours.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert (ours.sliding_window is None) == (not ref.sliding_window)
