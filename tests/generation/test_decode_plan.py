"""The decode plan (loom/generation/decode_plan.py): generation through it gives bitwise the tokens and scores of the
model's own forward, and whatever the plan assumed when it was built (hooks, modules, parameters, dtype, train mode)
is honoured when it changes, between generate calls or in the middle of one (a streamer's callback changing the
model), by falling back to the forward. Llama, Qwen3 (per-head q/k norms) and the mixture-of-experts families
(Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert and a dense layer). Runs with loom's kernels on and off (off:
no plan is built)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from loom.generation.decode_plan import DecodePlan
from loom.kernels import KernelLinear, build, policy
from loom.kernels.chain import DecodeChain, LayerTensors, Routing
from loom.models.moe import SparseMoE
from loom.quantization.linear import Int8Linear
from test_fused_decode import _model

KW = dict(do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def _generate(model, monkeypatch, plan: bool, **kw):
    """(output, layer steps the plan's chain ran)."""
    steps = [0]
    run = DecodeChain.run

    def counted(self, *args):
        steps[0] += self.n
        return run(self, *args)
    with monkeypatch.context() as m:
        m.setattr(DecodeChain, "run", counted)
        if not plan:
            m.setattr(DecodePlan, "build", classmethod(lambda cls, *args: None))
        out = model.generate(**{**KW, **kw})
    return out, steps[0]


def _same(a, b) -> bool:
    return a.sequences.tolist() == b.sequences.tolist() and all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def _ids(rows=1, n=7, seed=0):
    return torch.randint(3, 99, (rows, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("model_type,rows,padded", [("llama", 1, False), ("llama", 3, False), ("llama", 3, True),
                                                    ("qwen2", 1, False), ("qwen3", 3, True), ("mixtral", 1, False),
                                                    ("mixtral", 3, True), ("qwen3_moe", 1, False),
                                                    ("qwen3_moe", 3, True), ("qwen2_moe", 3, True)])
def test_plan_equals_the_forward(model_type, rows, padded, dtype, cache, monkeypatch):
    """Tokens and scores bitwise, past the dynamic cache's first growths (16 positions, then doubling), over a
    static cache (its whole length, masked), in a padded batch too (its mask and per-row positions). Mixtral routes
    with renormalised float32 weights, Qwen3-MoE (norm_topk_prob) with weights cast to the model's dtype, Qwen2-MoE
    without renormalising, plus its gated shared expert, with a dense layer between two MoE layers."""
    model = _model(model_type, dtype)
    mask = torch.ones(rows, 7, dtype=torch.long)
    if padded:
        mask[0, :2] = mask[2, :5] = 0
    kw = dict(input_ids=_ids(rows), attention_mask=mask, max_new_tokens=40, cache_implementation=cache)
    a, steps = _generate(model, monkeypatch, True, **kw)
    b, none = _generate(model, monkeypatch, False, **kw)
    assert _same(a, b) and none == 0
    planned = build.available() and (rows == 1 or dtype is torch.float32 or policy.batched_bf16())
    assert steps == (39 * model.config.num_hidden_layers if planned else 0)


def _changed_between(model, monkeypatch, change):
    """Generate, apply `change`, generate again with and without the plan: (planned, unplanned, plan steps)."""
    _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=8)
    change()
    a, steps = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=8)
    b, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=8)
    assert _same(a, b)
    return a, steps


def test_a_hook_registered_after_a_generate_is_honoured(monkeypatch):
    model = _model("llama", torch.float32)
    before, _ = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=8)
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, args, out: out * -2)
    try:
        after, steps = _changed_between(model, monkeypatch, lambda: None)
    finally:
        handle.remove()
    assert steps == 0 and not _same(before, after)
    again, steps = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=8)
    assert _same(before, again) and steps == (7 * 2 if build.available() else 0)  # hook gone: the plan again


def test_a_replaced_module_and_a_dtype_change_are_honoured(monkeypatch):
    model = _model("llama", torch.float32)
    before, _ = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=8)
    mlp = model.model.layers[0].mlp

    def replace():
        new = KernelLinear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
        new.weight.data = mlp.down_proj.weight.data * -1
        mlp.down_proj = new
    after, steps = _changed_between(model, monkeypatch, replace)
    assert not _same(before, after) and steps == (7 * 2 if build.available() else 0)  # the new weights, planned
    mlp.down_proj = nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)  # not loom's
    _, steps = _changed_between(model, monkeypatch, lambda: None)
    assert steps == 0
    model.to(torch.bfloat16)
    mlp.down_proj.__class__ = KernelLinear
    bf16, steps = _changed_between(model, monkeypatch, lambda: None)
    assert bf16.scores[0].dtype is torch.float32 and steps == (7 * 2 if build.available() else 0)


class _Changer:
    """A streamer whose `put` changes the model after `at` tokens (the prompt counts as one put)."""

    def __init__(self, at: int, change) -> None:
        self.at, self.change, self.puts = at, change, 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == self.at:
            self.change()

    def end(self) -> None:
        pass


@pytest.mark.parametrize("what", ["hook", "pre-hook", "module", "parameter", "forward", "train", "global hook",
                                  "layer added", "head hook", "final norm weight", "head forward"])
def test_a_change_in_the_middle_of_a_generate_falls_back(what, monkeypatch):
    """The plan notices at the next step and the forward takes over: the same tokens and scores as a generate that
    never planned, and plan steps only before the change."""
    model = _model("llama", torch.float32)
    if what in ("head hook", "final norm weight", "head forward"):  # a head the chain computes (a quantized one)
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    layer = model.model.layers[1]
    undo = []

    def change():
        if what == "hook":
            undo.append(layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: out * 3))
        elif what == "pre-hook":
            undo.append(layer.input_layernorm.register_forward_pre_hook(lambda m, args: (args[0] * 2,)))
        elif what == "module":
            layer.mlp.act_fn = nn.GELU()
        elif what == "parameter":
            layer.mlp.up_proj.weight = nn.Parameter(layer.mlp.up_proj.weight.detach() * 2)
        elif what == "forward":
            layer.mlp.forward = lambda x: torch.zeros_like(x)
        elif what == "train":
            model.train()
        elif what == "layer added":
            model.model.layers.append(model.model.layers[0])
            model.model.windows.append(None)
        elif what == "head hook":  # the head the chain computes: its hooks are checked as the layers' modules are
            undo.append(model.lm_head.register_forward_hook(lambda m, args, out: out * 3))
        elif what == "final norm weight":
            model.model.norm.weight = nn.Parameter(model.model.norm.weight.detach() * 2)
        elif what == "head forward":
            model.lm_head.forward = lambda x: torch.zeros(*x.shape[:-1], model.config.vocab_size)
        else:
            undo.append(nn.modules.module.register_module_forward_hook(lambda m, args, out: None))

    results = []
    for plan in (True, False):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        act = layer.mlp.act_fn
        try:
            with torch.random.fork_rng():
                results.append(_generate(model, monkeypatch, plan, input_ids=_ids(), max_new_tokens=10,
                                         streamer=_Changer(4, change)))
        finally:
            for h in undo:
                h.remove()
            undo.clear()
            layer.mlp.__dict__.pop("forward", None)
            model.lm_head.__dict__.pop("forward", None)
            model.model.norm.weight = nn.Parameter(state["model.norm.weight"])
            del model.model.layers[2:]
            del model.model.windows[2:]
            layer.mlp.act_fn = act
            layer.mlp.up_proj.weight = nn.Parameter(state["model.layers.1.mlp.up_proj.weight"])
            model.eval()
    (a, steps), (b, _) = results
    assert _same(a, b)
    assert steps == (2 * 2 if build.available() else 0)  # the steps before the change (tokens 2 and 3)


def test_no_plan_where_it_does_not_apply(monkeypatch):
    """Hidden states asked for, a variant layer: the forward, as before."""
    model = _model("llama", torch.float32)
    ids = _ids(2)
    for kw in (dict(output_hidden_states=True),):
        a, steps = _generate(model, monkeypatch, True, input_ids=ids, max_new_tokens=6, **kw)
        b, _ = _generate(model, monkeypatch, False, input_ids=ids, max_new_tokens=6, **kw)
        assert _same(a, b) and steps == 0
    gemma = _model("gemma3_text", torch.float32)  # (1 + w) norms, scaled embeddings: not the chain's step
    olmo2 = _model("olmo2", torch.float32)  # post-norm layers, without Llama's input_layernorm
    qwen2_moe = _model("qwen2_moe", torch.float32)
    qwen2_moe.model.layers[0].mlp.shared_expert.act_fn = nn.GELU()  # an activation the plan does not know
    for model in (gemma, olmo2, qwen2_moe):
        a, steps = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=4)
        b, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=4)
        assert _same(a, b) and steps == 0


@pytest.mark.skipif(not build.available(), reason="the chain needs loom's C kernels (LOOM_KERNELS=off here)")
def test_chain_names_bad_inputs():
    model = _model("llama", torch.float32)
    layer = model.model.layers[0]
    mods = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mods += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    weights = [m.weight.detach() for m in mods]
    norms = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
    D = model.config.head_dim

    def chain(ws, rows=1, dtype=torch.float32):
        return DecodeChain([LayerTensors(*norms, ws, [None] * 7, 1e-6, D ** -0.5, None)], rows, dtype, D)
    with pytest.raises(ValueError, match="layer 0: weights must be contiguous float32"):
        chain(weights[:6] + [weights[6].t()])
    with pytest.raises(ValueError, match="layer 0: projection shapes"):
        chain(weights[:6] + [weights[5]])
    with pytest.raises(ValueError, match="rows=17 must be 1..16"):
        chain(weights, rows=17)
    ok = chain(weights)
    with pytest.raises(ValueError, match=r"layer 0: cache buffers \(1, 2, 8, 4\)"):
        ok.set_cache(0, torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4))
    cos = torch.ones(1, 1, 1, D)
    assert not ok.fits(cos, cos, 0)  # no cache set yet: no room for position 0
    ok.set_cache(0, torch.zeros(1, 2, 8, D), torch.zeros(1, 2, 8, D))
    assert ok.fits(cos, cos, 7) and not ok.fits(cos, cos, 8) and not ok.fits(cos.double(), cos.double(), 0)
    head, final = model.lm_head.weight.detach(), model.model.norm.weight.detach()
    with pytest.raises(ValueError, match="the final norm .* and head .* must be contiguous float32"):
        ok.set_head(final, 1e-6, head[:, :-1], None)
    with pytest.raises(ValueError, match="the final norm"):
        ok.set_head(final, 1e-6, head.bfloat16(), None)
    with pytest.raises(ValueError, match="the final norm"):
        ok.set_head(final, 1e-6, head, torch.zeros(3))
    assert ok.head is None
    ok.set_head(final, 1e-6, head, None)
    assert ok.head is not None and ok.head_tensors() == [final, head]


def test_swapped_parameter_data_in_the_middle_of_a_generate_falls_back(monkeypatch):
    """`param.data = ...` keeps the parameter but moves its memory: the chain's pointers would be stale (it holds the
    old memory, so nothing dangles), and the plan hands the step back to the forward, which reads the new data."""
    model = _model("llama", torch.float32)
    weight = model.model.layers[0].self_attn.o_proj.weight
    original = weight.data
    results = []
    for plan in (True, False):
        def change():
            weight.data = original * -1
        try:
            results.append(_generate(model, monkeypatch, plan, input_ids=_ids(), max_new_tokens=10,
                                     streamer=_Changer(4, change)))
        finally:
            weight.data = original
    (a, steps), (b, _) = results
    assert _same(a, b) and steps == (2 * 2 if build.available() else 0)


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
@pytest.mark.parametrize("sample", [False, True])
def test_beam_search_and_sampling_through_the_plan(sample, model_type, monkeypatch):
    """Beam search reorders the cache (new buffers: the plan re-points its chain) and sampling draws from the plan's
    logits: the same sequences and scores as without the plan."""
    model = _model(model_type, torch.float32)
    kw = dict(input_ids=_ids(2), max_new_tokens=12, num_beams=1 if sample else 3, do_sample=sample)
    results = []
    for plan in (True, False):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            results.append(_generate(model, monkeypatch, plan, **kw))
    (a, steps), (b, _) = results
    assert _same(a, b)
    if not sample:
        assert torch.equal(a.sequences_scores, b.sequences_scores)
    assert steps == (11 * 2 if build.available() else 0)


@pytest.mark.parametrize("what", ["expert hook", "router hook", "expert weight", "expert replaced", "router logits",
                                  "top_k", "shared expert added"])
def test_a_moe_change_in_the_middle_of_a_generate_falls_back(what, monkeypatch):
    """What a MoE block's step depends on beyond a dense layer's (its experts and their packed weights, the router,
    the router-logits recording) is honoured at the next step as in the middle of a dense generate."""
    model = _model("mixtral", torch.float32)
    block = model.model.layers[1].block_sparse_moe
    config, undo = model.config, []
    original = block.experts[2].w1.weight.data
    torch.manual_seed(1)
    replacement = type(block.experts[2])(config)  # plain nn.Linears: the block's module path
    shared_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def change():
        if what == "expert hook":
            undo.append(block.experts[2].register_forward_hook(lambda m, args, out: out * 3))
        elif what == "router hook":
            undo.append(block.gate.register_forward_hook(lambda m, args, out: out.flip(-1)))
        elif what == "expert weight":  # new memory: the forward packs the experts again
            block.experts[2].w1.weight.data = original * -2
        elif what == "expert replaced":
            block.experts[2] = replacement
        elif what == "router logits":
            config.output_router_logits = True
        elif what == "shared expert added":
            block.shared_expert, block.shared_expert_gate = replacement, shared_gate
        else:
            block.top_k = 1

    results = []
    for plan in (True, False):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        expert = block.experts[2]
        try:
            results.append(_generate(model, monkeypatch, plan, input_ids=_ids(), max_new_tokens=10,
                                     streamer=_Changer(4, change)))
        finally:
            for h in undo:
                h.remove()
            undo.clear()
            block.experts[2] = expert
            expert.w1.weight.data = original
            config.output_router_logits = False
            block.top_k = 2
            if "shared_expert" in block._modules:
                del block.shared_expert, block.shared_expert_gate
                block.shared_expert = block.shared_expert_gate = None
            model.load_state_dict(state)
    (a, steps), (b, _) = results
    assert _same(a, b)
    assert steps == (2 * 2 if build.available() else 0)


def test_a_moe_block_without_packed_experts_is_not_planned(monkeypatch):
    """Hooks on an expert keep the block on its module path (no packed experts): the plan steps aside."""
    model = _model("qwen3_moe", torch.bfloat16)
    handle = model.model.layers[0].mlp.experts[1].register_forward_pre_hook(lambda m, args: None)
    try:
        a, steps = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=6)
        b, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=6)
    finally:
        handle.remove()
    assert _same(a, b) and steps == 0
    assert isinstance(model.model.layers[0].mlp, SparseMoE)


@pytest.mark.skipif(not build.available(), reason="the chain needs loom's C kernels (LOOM_KERNELS=off here)")
def test_chain_names_bad_moe_inputs():
    model = _model("mixtral", torch.float32)
    layer = model.model.layers[0]
    block = layer.block_sparse_moe
    attn = [getattr(layer.self_attn, n).weight.detach() for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    with torch.no_grad():
        gate_up, down = block.decode_experts(1, torch.float32)
    norms = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
    D = model.config.head_dim

    def chain(ws, top_k=2):
        return DecodeChain([LayerTensors(*norms, ws, [None] * 7, 1e-6, D ** -0.5, None, Routing(top_k, True, False))],
                           1, torch.float32, D)
    router = block.gate.weight.detach()
    assert chain(attn + [router, gate_up, down]).n == 1
    with pytest.raises(ValueError, match="layer 0: weights must be contiguous float32"):
        chain(attn + [router, gate_up[0], down])  # 2-D where the packed experts are 3-D
    with pytest.raises(ValueError, match="layer 0: projection shapes"):
        chain(attn + [router, gate_up, down[:, :, :-1].contiguous()])
    with pytest.raises(ValueError, match="layer 0: projection shapes"):
        chain(attn + [router, gate_up, down], top_k=len(block.experts) + 1)


@pytest.mark.parametrize("what", ["shared gate hook", "shared expert weight"])
def test_a_shared_expert_change_in_the_middle_of_a_generate_falls_back(what, monkeypatch):
    model = _model("qwen2_moe", torch.float32)
    block = model.model.layers[2].mlp
    original, undo = block.shared_expert.up_proj.weight.data, []

    def change():
        if what == "shared gate hook":
            undo.append(block.shared_expert_gate.register_forward_hook(lambda m, args, out: out - 4))
        else:
            block.shared_expert.up_proj.weight.data = original * -1

    results = []
    for plan in (True, False):
        try:
            results.append(_generate(model, monkeypatch, plan, input_ids=_ids(), max_new_tokens=10,
                                     streamer=_Changer(4, change)))
        finally:
            for h in undo:
                h.remove()
            undo.clear()
            block.shared_expert.up_proj.weight.data = original
    (a, steps), (b, _) = results
    assert _same(a, b)
    assert steps == (2 * 3 if build.available() else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 3, 4])
def test_moe_plan_at_every_top_k(top_k, dtype, monkeypatch):
    """One expert per token, three (a renormalising sum over more than two weights), every expert: bitwise."""
    model = _model("qwen3_moe", dtype, num_experts_per_tok=top_k)
    kw = dict(input_ids=_ids(2), max_new_tokens=12)
    a, steps = _generate(model, monkeypatch, True, **kw)
    b, _ = _generate(model, monkeypatch, False, **kw)
    assert _same(a, b)
    planned = build.available() and (dtype is torch.float32 or policy.batched_bf16())
    assert steps == (11 * model.config.num_hidden_layers if planned else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_head_runs_in_the_chain_unless_hooked(dtype, monkeypatch):
    """A quantized head and the final norm run in the chain's last call (the plan's step calls no module), bitwise
    the modules'; a dense head (held by the chain for greedy runs only), or a hook on either at build time, keeps them
    module calls at each step, the hook honoured."""
    model = _model("llama", dtype)
    calls, built = [], []
    build_ = DecodePlan.build.__func__
    monkeypatch.setattr(DecodePlan, "build", classmethod(lambda cls, *a: built.append(build_(cls, *a)) or built[-1]))
    dense, _ = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=8)
    if build.available():
        assert built[-1].chain.head is not None and not built[-1].chain.head_in_step
    model.lm_head = Int8Linear.from_linear(model.lm_head)
    a, steps = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=8)
    assert _same(a, _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=8)[0])
    if build.available():
        assert built[-1].chain.head is not None and built[-1].chain.head_in_step
    handle = model.lm_head.register_forward_hook(lambda m, args, out: calls.append(1) or out * 0.5)
    try:
        b, steps_b = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=8)
        c, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=8)
    finally:
        handle.remove()
    assert _same(b, c) and not _same(a, b) and len(calls) == 16  # 8 tokens, with and without the plan
    if build.available():
        assert built[-1].chain.head is None and steps_b == steps == 7 * 2
