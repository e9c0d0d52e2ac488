"""The decode plan over loom's weight-only quantized Linears (Int8Linear, Int4Linear symmetric and asymmetric,
Int8GroupLinear as GGUF's Q8_0 loads), alone or mixed with plain kernel Linears: generation through the plan gives
bitwise the tokens and scores of the model's forward (padded batches, static caches, beams, sampling, biases, bf16,
Qwen3's q/k norms, a MoE model's attention), and whatever the plan recorded about a quantized module (its buffers,
their memory, its kernel and layout settings, any attribute it holds, hooks) is honoured when it changes in the
middle of a generate, by falling back to the forward. With the kernels off no plan is built; every instruction-set
level gives the same bits as the forward at that level."""
from __future__ import annotations

import os
import textwrap

import pytest
import torch
from torch import nn

from loom.kernels import KernelLinear, build, ops, policy
from loom.kernels.chain import DecodeChain, LayerTensors, Quantized
from loom.quantization import WeightOnlyConfig, kernels, quantize_
from loom.quantization.linear import Int4Linear, Int8GroupLinear, Int8Linear
from loomtest import kernels_off_for, run_at_level
from test_decode_plan import _Changer, _generate, _ids, _same
from test_fused_decode import _model

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("int8", "int8_group", "int4", "int4_sym", "plain")
needs_kernels = pytest.mark.skipif(not build.available(), reason="the plan needs loom's C kernels (off here)")


def _group8(linear: nn.Linear, group: int = 16, scale_dtype=torch.float16) -> Int8GroupLinear:
    """Symmetric group-wise int8 (GGUF Q8_0's layout at group 32, float16 scales)."""
    out, inp = linear.weight.shape
    m = Int8GroupLinear(inp, out, linear.bias is not None, group, scale_dtype, dtype=linear.weight.dtype)
    w = linear.weight.detach().float().view(out, inp // group, group)
    scale = (w.abs().amax(2) / 127).clamp(min=1e-8).to(scale_dtype)
    m.weight = torch.round(w / scale.float()[..., None]).clamp(-127, 127).to(torch.int8).view(out, inp)
    m.weight_scale = scale
    if linear.bias is not None:
        m.bias = nn.Parameter(linear.bias.detach().clone())
    m.choose_kernel()
    return m


def _convert(linear: nn.Linear, kind: str) -> nn.Module:
    if kind == "int8":
        return Int8Linear.from_linear(linear)
    if kind == "int8_group":
        return _group8(linear, scale_dtype=torch.float32 if linear.out_features < 32 else torch.float16)
    if kind in ("int4", "int4_sym"):
        return Int4Linear.from_linear(linear, 16, symmetric=kind == "int4_sym")
    return linear


def _quantized(kind: str, model_type: str = "llama", dtype=torch.float32, head: bool = False, **overrides):
    """A tiny model whose decoder layers' projections are all `kind` ("mixed": the kinds in turn, plain kernel
    Linears among them), its head too where `head`."""
    model = _model(model_type, dtype, intermediate_size=64, **overrides)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):  # initialised to zeros: give them values, so that adding them is checked
            p.data.copy_(torch.randn(p.shape, generator=gen))
    if kind in ("int8", "int4", "int4_sym") and model_type in ("llama", "qwen2", "qwen3"):
        quantize_(model, WeightOnlyConfig(bits=8 if kind == "int8" else 4, group_size=None if kind == "int8" else 16,
                                          symmetric=kind == "int4_sym" if kind != "int8" else None,
                                          skip_output_embeddings=not head))
        return model
    n = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, getattr(layer, "mlp", None)):
            for name, child in list(parent.named_children()):
                if type(child) is KernelLinear and name.endswith("_proj"):
                    setattr(parent, name, _convert(child, KINDS[n % len(KINDS)] if kind == "mixed" else kind))
                    n += 1
    if head:
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    return model


def _both(make, monkeypatch, **kw):
    """(planned, unplanned, plan steps): each generate on a fresh model from `make`."""
    results = []
    for plan in (True, False):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            results.append(_generate(make(), monkeypatch, plan, **kw))
    (a, steps), (b, none) = results
    assert none == 0
    return a, b, steps


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("rows,padded", [(1, False), (3, True)])
@pytest.mark.parametrize("kind,head", [("int8", False), ("int8", True), ("int4", False), ("int4_sym", True),
                                       ("int8_group", False), ("mixed", False), ("mixed", True)])
def test_quantized_plan_equals_the_forward(kind, head, rows, padded, cache, monkeypatch):
    mask = torch.ones(rows, 7, dtype=torch.long)
    if padded:
        mask[0, :2] = mask[2, :5] = 0
    kw = dict(input_ids=_ids(rows), attention_mask=mask, max_new_tokens=24, cache_implementation=cache)
    a, b, steps = _both(lambda: _quantized(kind, head=head), monkeypatch, **kw)
    assert _same(a, b)
    assert steps == (23 * 2 if build.available() else 0)


@pytest.mark.parametrize("model_type,kind,dtype", [
    ("llama", "int8", torch.bfloat16), ("llama", "int4", torch.bfloat16), ("llama", "mixed", torch.bfloat16),
    ("qwen2", "int8", torch.float32), ("qwen2", "mixed", torch.float32), ("qwen2", "int4", torch.bfloat16),
    ("qwen3", "mixed", torch.float32), ("qwen3_moe", "mixed", torch.float32), ("qwen3_moe", "int4", torch.bfloat16)])
def test_biases_bf16_qk_norms_and_moe_attention(model_type, kind, dtype, monkeypatch):
    """Qwen2's biased q/k/v (the module's `y + bias`), bf16 models (the product cast as the operator casts it),
    Qwen3's per-head norms, and a MoE model whose attention projections are quantized (its experts stay packed)."""
    a, b, steps = _both(lambda: _quantized(kind, model_type, dtype), monkeypatch, input_ids=_ids(), max_new_tokens=12)
    assert _same(a, b)
    assert steps == (11 * 2 if build.available() else 0)


@pytest.mark.parametrize("sample", [False, True])
def test_beams_and_sampling(sample, monkeypatch):
    kw = dict(input_ids=_ids(2), max_new_tokens=10, num_beams=1 if sample else 3, do_sample=sample)
    a, b, steps = _both(lambda: _quantized("mixed", head=True), monkeypatch, **kw)
    assert _same(a, b)
    if not sample:
        assert torch.equal(a.sequences_scores, b.sequences_scores)
    assert steps == (9 * 2 if build.available() else 0)


def test_gguf_q8_0_model_through_the_plan(tmp_path, monkeypatch):
    """A Q8_0 GGUF file (token embeddings and norms float32, every Linear group-wise int8 with float16 scales)."""
    pytest.importorskip("gguf")
    import loom
    from ggufwrite import write_gguf
    from loomtest import reference_checkpoint

    class Factory:
        def mktemp(self, name):
            return tmp_path

    folder, ref = reference_checkpoint(Factory(), "llama", "LlamaForCausalLM", intermediate_size=64,
                                       tie_word_embeddings=False)
    write_gguf(folder / "tiny-Q8_0.gguf", ref, "llama", "Q8_0")

    def load():
        return loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q8_0.gguf")
    model = load()
    assert type(model.model.layers[0].self_attn.q_proj) is Int8GroupLinear
    a, b, steps = _both(load, monkeypatch, input_ids=_ids(2), max_new_tokens=10)
    assert _same(a, b)
    assert steps == (9 * 2 if build.available() else 0)


def _activation_bits_switch(monkeypatch):
    """Stand-in for a future runtime setting that makes an Int4Linear call another operator (an instance attribute
    the plan does not know, read by its matmul): with it set the product differs, so a plan that skipped the module
    would differ too. (The real 8-bit activation switch is tested at the end of this file.)"""
    original = kernels.int4_matmul

    def matmul(x, module):
        y = original(x, module)
        return y * 1.5 if getattr(module, "extra_setting", None) == 8 else y
    monkeypatch.setattr(kernels, "int4_matmul", matmul)


CHANGES = ["hook", "pre-hook", "buffer replaced", "scale replaced", "weight data", "zero data", "kernel",
           "group size", "asymmetric", "new attribute", "class attribute", "bits", "bias added", "forward"]


@pytest.mark.parametrize("what", CHANGES)
def test_a_quantized_module_changed_in_the_middle_of_a_generate_falls_back(what, monkeypatch):
    """Changed at the 4th streamed token: plan steps before it (tokens 2 and 3), the forward after, and the same
    tokens and scores as a generate that never planned."""
    _activation_bits_switch(monkeypatch)
    original8 = kernels.int8_matmul
    monkeypatch.setattr(kernels, "int8_matmul", lambda x, module: original8(x, module) * (module.bits / 8))

    def change_of(model):
        layer = model.model.layers[1]
        q, v, down = layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj  # int8, int4, int4_sym
        assert (type(q), type(v), v.asymmetric, down.asymmetric) == (Int8Linear, Int4Linear, True, False)

        def change():
            if what == "hook":
                q.register_forward_hook(lambda m, args, out: out * 3)
            elif what == "pre-hook":
                v.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
            elif what == "buffer replaced":
                v.weight = v.weight ^ 0x11
            elif what == "scale replaced":
                q.weight_scale = q.weight_scale * 2
            elif what == "weight data":
                q.weight.data = q.weight.data.neg()
            elif what == "zero data":
                v.weight_zero.data = v.weight_zero.data.clone().fill_(3)
            elif what == "kernel":
                q.kernel = "dequantize"
            elif what == "group size":  # the module would then fail or compute otherwise: never the plan's product
                down.group_size = 32
            elif what == "asymmetric":
                v.asymmetric = False
            elif what == "new attribute":
                for m in model.modules():
                    if isinstance(m, Int4Linear):
                        m.extra_setting = 8
            elif what == "class attribute":  # a class-level default the matmul reads
                Int4Linear.extra_setting = 8
            elif what == "bits":
                Int8Linear.bits = 4
            elif what == "bias added":
                q.bias = nn.Parameter(torch.ones(q.out_features))
            else:
                down.forward = lambda x: torch.zeros(*x.shape[:-1], down.out_features)
        return change

    results = []
    for plan in (True, False):
        model = _quantized("mixed")
        with torch.random.fork_rng():
            try:
                results.append(_generate(model, monkeypatch, plan, input_ids=_ids(), max_new_tokens=10,
                                         streamer=_Changer(4, change_of(model))))
            except (RuntimeError, ValueError) as e:  # a group size the module cannot run: it raises both times
                results.append((type(e), 2 * 2 if plan and build.available() else 0))
            finally:
                Int8Linear.bits = 8
                if "extra_setting" in Int4Linear.__dict__:
                    del Int4Linear.extra_setting
    (a, steps), (b, _) = results
    assert a == b if isinstance(a, type) else _same(a, b)
    assert steps == (2 * 2 if build.available() else 0)


def test_settings_the_plan_does_not_take_keep_it_off(monkeypatch):
    """An attribute it does not know (a setting added to an Int4Linear), another kernel choice, a module whose
    buffers are not contiguous: no plan, the forward's tokens."""
    _activation_bits_switch(monkeypatch)

    def unknown():
        model = _quantized("mixed")
        model.model.layers[0].self_attn.v_proj.extra_setting = 8
        return model

    def other_kernel():
        model = _quantized("int8")
        model.model.layers[1].mlp.up_proj.kernel = "dequantize"
        return model
    def strided():
        model = _quantized("int8")
        m = model.model.layers[0].self_attn.k_proj
        scale = torch.zeros(2 * m.out_features)[::2]
        m._buffers["weight_scale"] = scale.copy_(m.weight_scale)  # the operator copies it; the plan would not
        return model
    for make in (unknown, other_kernel, strided):
        a, b, steps = _both(make, monkeypatch, input_ids=_ids(), max_new_tokens=6)
        assert _same(a, b) and steps == 0


def test_kernels_off_builds_no_plan(monkeypatch):
    model = _quantized("mixed", head=True)
    kernels_off_for(monkeypatch)
    assert not policy.enabled()
    a, steps = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=6)
    b, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=6)
    assert _same(a, b) and steps == 0


@needs_kernels
def test_chain_names_bad_quantized_inputs():
    model = _quantized("int4")
    layer = model.model.layers[0]
    mods = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mods += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    norms = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
    D = model.config.head_dim

    def chain(quant):
        return DecodeChain([LayerTensors(*norms, [m.weight for m in mods], [None] * 7, 1e-6, D ** -0.5, None,
                                         quant=quant)], 1, torch.float32, D)
    good = [Quantized("int4", m.weight_scale, m.weight_zero, 16) for m in mods]
    chain(good)
    for bad in (Quantized("int4", mods[0].weight_scale, mods[0].weight_zero, 32),  # scales of group 16
                Quantized("int8", mods[0].weight_scale),  # a uint8 packed weight, float16 scales
                Quantized("int4", mods[0].weight_scale.t(), None, 16)):
        with pytest.raises(ValueError, match="layer 0: a quantized projection's weight, scales or zero points"):
            chain([bad] + good[1:])
    with pytest.raises(ValueError, match="layer 0: weights must be contiguous float32"):
        chain([None] + good[1:])  # a packed uint8 weight taken as a float one


# -- every level this CPU supports, each in its own process: plan and forward give the same bits --------------------
_CHILD = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import pytest, torch
    from loom.kernels import build
    import test_decode_plan_quantized as t
    out = {"describe": build.describe(), "cases": []}
    with pytest.MonkeyPatch.context() as mp:
        for kind, head, rows, dtype in (("mixed", True, 1, torch.float32), ("int4", False, 3, torch.float32),
                                        ("int8_group", False, 2, torch.float32), ("mixed", False, 1, torch.bfloat16)):
            a, b, steps = t._both(lambda: t._quantized(kind, dtype=dtype, head=head), mp, input_ids=t._ids(rows),
                                  max_new_tokens=8)
            out["cases"].append([kind, t._same(a, b), steps])
    print(json.dumps(out))
""")


@needs_kernels
@pytest.mark.parametrize("level", ["x86-64-v3", "x86-64-v4"])
def test_every_kernel_level(level):
    if level not in build.supported_levels():
        pytest.skip(f"this CPU does not run {level}")
    run = run_at_level(_CHILD, level, HERE, os.path.dirname(HERE))
    assert run["describe"] == f"on ({level})", run["describe"]
    assert all(same and steps == 7 * 2 for _, same, steps in run["cases"]), run["cases"]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eight_bit_activations_run_their_kernel_in_the_plan(dtype, monkeypatch):
    """`set_activation_bits(model, 8)` moves int4 Linears to loom::int4_linear_a8; the plan calls the same kernel on
    the same tiles (bitwise the forward's tokens and scores), and a switch in the middle of a generate (8 -> 16 or
    16 -> 8: another operator) makes it fall back to the forward from then on."""
    from loom.quantization import set_activation_bits

    def make(bits_at_start):
        model = _model("llama", dtype, hidden_size=64, intermediate_size=64)
        quantize_(model, WeightOnlyConfig(bits=4, group_size=32))
        set_activation_bits(model, bits_at_start)
        return model

    a, b, steps = _both(lambda: make(8), monkeypatch, input_ids=_ids(), max_new_tokens=8)
    n_layers = len(make(8).model.layers)
    assert _same(a, b) and steps == 7 * n_layers
    for start, then in ((16, 8), (8, 16)):
        results = []
        for plan in (True, False):
            model = make(start)
            results.append(_generate(model, monkeypatch, plan, input_ids=_ids(), max_new_tokens=10,
                                     streamer=_Changer(4, lambda model=model: set_activation_bits(model, then))))
        (a, steps), (b, _) = results
        assert _same(a, b)
        assert steps == 2 * n_layers  # tokens 2-3 planned, the forward after the switch


@needs_kernels
def test_eight_bit_plan_uses_the_a8_kernel(monkeypatch):
    """The chain's projections are the 8-bit kernel's (their outputs differ from the int16 ones), not the default."""
    from loom.generation.decode_plan import DecodePlan
    from loom.quantization import set_activation_bits

    built = []
    build_plan = DecodePlan.build.__func__
    monkeypatch.setattr(DecodePlan, "build", classmethod(lambda cls, *a: built.append(build_plan(cls, *a)) or built[-1]))
    outs = {}
    for bits in (8, 16):
        model = _model("llama", torch.float32, hidden_size=64, intermediate_size=64)
        quantize_(model, WeightOnlyConfig(bits=4, group_size=32))
        set_activation_bits(model, bits)
        outs[bits] = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=6)[0]
        quant = [q for lt in built[-1].chain.layers for q in lt.quant if q is not None]
        assert quant and all(q.a8 == (bits == 8) for q in quant)
        assert all(q.tiles is not None for q in quant) == (bits == 8 or ops.int4_tiles_int16())
    assert not all(torch.equal(x, y) for x, y in zip(outs[8].scores, outs[16].scores))
