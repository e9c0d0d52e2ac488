"""The fused decode step (loom::rope_cache_attention: RoPE, cache write and attention of one layer in one call) gives
bitwise what the torch ops it replaces give: the operator against those ops, and greedy generation with the fused
path against the same generation with it switched off, over dtypes, batch 1 and a padded batch, dynamic and static
caches, and the families whose attention differs (sliding windows, per-head norms, MoE, fused qkv, soft-capping),
with a forward hook that changes a projection. Runs with loom's kernels on and off (off: the operator's torch path
and the unfused generation)."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.auto import model_table
from loom.generation.decode_plan import DecodePlan
from loom.kernels import build, ops, policy
from loom.kernels.chain import DecodeChain
from loom.models import llama
from loom.models.common import sdpa
from loom.models.rope import apply_rotary
from loomtest import TINY

DTYPES = (torch.float32, torch.bfloat16)


def _rope_tables(B, D, dtype, g):
    ang = torch.rand(B, 1, 1, D // 2, generator=g) * 50
    cos, sin = ang.cos(), ang.sin()
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,D,pos,length,masked,fused_qkv", [
    (1, 12, 4, 64, 40, 41, False, False),  # a dynamic cache's step at batch 1
    (3, 4, 2, 16, 7, 20, True, True),  # a static cache (length past pos, masked), rows of a fused qkv output
    (2, 4, 4, 8, 0, 1, False, False),  # the first cached position
])
def test_operator_matches_rotary_update_and_attention(dtype, B, H, Hkv, D, pos, length, masked, fused_qkv):
    g = torch.Generator().manual_seed(0)
    if fused_qkv:  # q, k, v as views of one projection output, rows strided
        qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g).to(dtype)
        q, k, v = (t.view(B, 1, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], -1))
    else:
        q, k, v = (torch.randn(B, 1, n, D, generator=g).to(dtype) for n in (H, Hkv, Hkv))
    cos, sin = _rope_tables(B, D, dtype, g)
    cache_k, cache_v = (torch.randn(B, Hkv, length + 3, D, generator=g).to(dtype) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, length, generator=g) > 0.3
        mask[..., pos] = True
    want_k, want_v = cache_k.clone(), cache_v.clone()
    with torch.inference_mode():
        rq, rk = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # what the model runs unfused
        want_k[:, :, pos:pos + 1] = rk
        want_v[:, :, pos:pos + 1] = v.transpose(1, 2)
        # what `sdpa` runs for one query with the kernels on (off: the operator's torch path, fp32 sums rounded once)
        want = ops.decode_attention(rq, want_k[:, :, :length], want_v[:, :, :length], mask, D ** -0.5)
        want = want.transpose(1, 2).reshape(B, 1, H * D)
        via_sdpa = sdpa(rq, want_k[:, :, :length], want_v[:, :, :length], mask, False, scale=D ** -0.5)
        got = ops.rope_cache_attention(q, k, v, cos, sin, cache_k, cache_v, pos, length, mask, D ** -0.5)
    assert got.shape == (B, 1, H * D) and got.dtype is dtype
    assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)  # the new token's row, nothing else
    assert torch.equal(got, want)
    if build.available():
        assert torch.equal(got, via_sdpa.transpose(1, 2).reshape(B, 1, H * D))


def test_operator_names_bad_inputs():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8)
    cos = sin = torch.ones(1, 1, 1, 8)
    cache = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="rope_cache_attention: needs 0 <= pos < length <= capacity"):
        ops.rope_cache_attention(q, k, k, cos, sin, cache, cache.clone(), 4, 5, None, 1.0)
    with pytest.raises(ValueError, match="rope_cache_attention: cos and sin must be"):
        ops.rope_cache_attention(q, k, k, cos[..., :4], sin[..., :4], cache, cache.clone(), 0, 1, None, 1.0)
    with pytest.raises(ValueError, match="rope_cache_attention: q, k, v, cos, sin and the caches must share"):
        ops.rope_cache_attention(q, k, k, cos, sin, cache.bfloat16(), cache.bfloat16(), 0, 1, None, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("biases", [False, True])
def test_layer_operator_matches_the_modules(dtype, biases):
    """loom::decode_layer_attention against the module path it replaces, on a Llama layer (Qwen2's biases too)."""
    model = _model("llama", dtype, attention_bias=biases, mlp_bias=biases)
    layer, B, D = model.model.layers[0], 1, model.config.head_dim
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 1, model.config.hidden_size, generator=g).to(dtype)
    cos, sin = _rope_tables(B, D, dtype, g)
    caches = [(torch.randn(B, 2, 9, D, generator=g).to(dtype), torch.randn(B, 2, 9, D, generator=g).to(dtype))]
    caches.append(tuple(t.clone() for t in caches[0]))
    attn, mlp = layer.self_attn, layer.mlp
    with torch.inference_mode():
        h = layer.input_layernorm(x)
        q, k, v = attn.project(h)
        a = ops.rope_cache_attention(q, k, v, cos, sin, *caches[0], 5, 6, None, D ** -0.5)
        want_x = x + attn.o_proj(a)
        h = layer.post_attention_layernorm(want_x)
        weights = [m.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)]
        biases_ = [m.bias for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)]
        got = ops.decode_layer_attention(x, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                         layer.input_layernorm.eps, *weights, *biases_, cos, sin, *caches[1], 5, 6,
                                         None, D ** -0.5)
        want = (want_x, mlp.gate_proj(h), mlp.up_proj(h))
    for w, t in zip(want, got):
        assert torch.equal(w, t)
    assert all(torch.equal(a, b) for a, b in zip(caches[0], caches[1]))
    with pytest.raises(ValueError, match=r"decode_layer_attention: wo must be a contiguous"):
        ops.decode_layer_attention(x, layer.input_layernorm.weight, layer.post_attention_layernorm.weight, 1e-6,
                                   *weights[:3], weights[3].t(), *weights[4:], *biases_, cos, sin, *caches[1], 5, 6,
                                   None, 1.0)


def _model(model_type, dtype, **overrides):
    config_class, heads = model_table()[model_type]
    torch.manual_seed(0)
    model = heads["causal-lm"](config_class(**{**TINY[model_type], **overrides})).to(dtype).eval()
    for p in model.parameters():  # a random tiny model's logits are near ties: spread them so argmax is robust
        p.data.mul_(4)
    return model


def _generate_both(model, monkeypatch, **kw):
    """(fused, unfused) greedy generations with scores, and the fused calls the first made: {operator: count}, with
    the layer steps the decode plan's chain ran under "chain" (the unfused generation runs without the plan)."""
    calls = {"rope_cache_attention": 0, "decode_layer_attention": 0}
    for name in calls:
        def counted(*args, _name=name, _op=getattr(ops, name)):
            calls[_name] += 1
            return _op(*args)
        monkeypatch.setattr(ops, name, counted)
    calls["chain"] = 0
    run = DecodeChain.run

    def counted_run(self, *args):
        calls["chain"] += self.n
        return run(self, *args)
    monkeypatch.setattr(DecodeChain, "run", counted_run)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
              **kw)
    a = model.generate(**kw)
    monkeypatch.setattr(policy, "rope_attention_applies", lambda *args: False)
    monkeypatch.setattr(llama, "fused_decode_layer", lambda *args, **kwargs: None)
    monkeypatch.setattr(DecodePlan, "build", classmethod(lambda cls, *args: None))
    b = model.generate(**kw)
    monkeypatch.undo()
    return a, b, calls


def _assert_same(a, b):
    assert a.sequences.tolist() == b.sequences.tolist()
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "gemma3_text", "qwen2_moe", "gemma2", "phi3"])
def test_generation_fused_equals_unfused(model_type, cache, dtype, monkeypatch):
    model = _model(model_type, dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[3, :2] = 0
    n_layers = model.config.num_hidden_layers
    for rows in (1, 4):
        a, b, calls = _generate_both(model, monkeypatch, input_ids=ids[:rows], attention_mask=mask[:rows],
                                     max_new_tokens=12, cache_implementation=cache)
        _assert_same(a, b)
        # a fused path ran at every decode step of every layer where one applies (soft-capped attention and partial
        # rotary take the torch ops; kernels off, the policy says no): the whole layer for Llama's own layers where
        # its Linears take the kernel, else the attention alone
        takes_fused = build.available() and model_type not in ("gemma2", "phi3")
        assert sum(calls.values()) == (11 * n_layers if takes_fused else 0)
        # Llama-shaped layers: all of Llama's and Mistral's, Qwen2-MoE's dense layer (1 of 3)
        llama_layers = {"llama": n_layers, "mistral": n_layers, "qwen2_moe": 1}.get(model_type, 0)
        whole_layer = takes_fused and (rows == 1 or dtype is torch.float32 or policy.EMULATED_BF16)
        # the decode plan runs every step of Llama's own layers (Qwen3's too: per-head norms; Qwen2-MoE's: experts)
        # where their Linears take the kernel (policy.dense_applies); Mistral's tiny sliding window (4) is behind the
        # prompt, so its steps need the window's mask, which the plan leaves to the model's forward
        plan = (takes_fused and model_type in ("llama", "qwen3", "qwen2_moe")
                and (rows == 1 or dtype is torch.float32 or policy.batched_bf16()))
        assert calls["chain"] == (11 * n_layers if plan else 0)
        if not plan:
            assert calls["decode_layer_attention"] == (11 * llama_layers if whole_layer else 0)


def test_hooked_projection_is_honoured(monkeypatch):
    """A hook that changes q_proj's output changes the fused step's result exactly as it changes the unfused one."""
    model = _model("llama", torch.float32)
    ids = torch.randint(3, 99, (1, 7), generator=torch.Generator().manual_seed(5))
    plain, _, _ = _generate_both(model, monkeypatch, input_ids=ids, max_new_tokens=10)
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, args, out: out * -3)
    try:
        a, b, calls = _generate_both(model, monkeypatch, input_ids=ids, max_new_tokens=10)
    finally:
        handle.remove()
    _assert_same(a, b)
    assert a.sequences.tolist() != plain.sequences.tolist() or any(
        not torch.equal(x, y) for x, y in zip(a.scores, plain.scores))
    # the hooked layer cannot skip q_proj's call: it takes the fused attention alone, the other layer the whole step
    want = {"rope_cache_attention": 9, "decode_layer_attention": 9, "chain": 0} if build.available() else {
        "rope_cache_attention": 0, "decode_layer_attention": 0, "chain": 0}
    assert calls == want


def test_hook_on_a_called_module_keeps_the_fused_layer(monkeypatch):
    """The fused layer still calls the activation and down_proj modules: their hooks run, and see the same tensors."""
    model = _model("llama", torch.float32)
    ids = torch.randint(3, 99, (1, 7), generator=torch.Generator().manual_seed(6))
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    try:
        a, b, calls = _generate_both(model, monkeypatch, input_ids=ids, max_new_tokens=6)
    finally:
        handle.remove()
    _assert_same(a, b)
    assert len(seen) == 2 * 6  # prefill + 5 steps, in each of the two generations
    assert all(torch.equal(x, y) for x, y in zip(seen[:6], seen[6:]))
    assert calls["decode_layer_attention"] == (5 * 2 if build.available() else 0)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 50257])
def test_argmax_rows_picks_as_torch(n):
    """The first maximal index, ties, a NaN anywhere (torch picks the first NaN), a row of -inf, every length."""
    g = torch.Generator().manual_seed(n)
    for trial in range(30):
        x = torch.randn(3, n, generator=g)
        if trial % 3 == 0:
            x = x.round()  # ties
        if trial % 5 == 0:
            x[1, int(torch.randint(0, n, (1,), generator=g))] = float("nan")
        if trial % 7 == 0:
            x[2] = float("-inf")
        assert torch.equal(ops.argmax_rows(x), x.argmax(-1))
    assert torch.equal(ops.argmax_rows(x.t().contiguous().t()), x.argmax(-1))  # a strided view is made contiguous
    with pytest.raises(ValueError, match="argmax_rows: expects dense float32"):
        ops.argmax_rows(x.double())


def test_opcheck():
    """Schema (the caches are declared mutated), fake implementations and AOT dispatch of the fused operators."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 1, 2, 8, generator=g)
    cos, sin = _rope_tables(2, 8, torch.float32, g)
    cache = torch.randn(2, 2, 6, 8, generator=g)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    torch.library.opcheck(torch.ops.loom.rope_cache_attention.default,
                          (q, k, k.clone(), cos, sin, cache, cache.clone(), 3, 6, mask, 0.3))
    model = _model("llama", torch.float32)
    layer = model.model.layers[0]
    mods = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
            layer.mlp.gate_proj, layer.mlp.up_proj)
    x = torch.randn(2, 1, model.config.hidden_size, generator=g)
    cos, sin = _rope_tables(2, model.config.head_dim, torch.float32, g)
    cache = torch.randn(2, 2, 6, model.config.head_dim, generator=g)
    torch.library.opcheck(torch.ops.loom.decode_layer_attention.default,
                          (x, layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                           1e-6, *(m.weight.detach() for m in mods), *(None,) * 6, cos, sin, cache, cache.clone(), 2,
                           3, None, 0.25))
    torch.library.opcheck(torch.ops.loom.argmax_rows.default, (torch.randn(3, 100, generator=g),))
