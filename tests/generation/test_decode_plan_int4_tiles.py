"""int4 Linears whose decode-size products read tiles (Int4Linear.wants_tiles: group size a multiple of 32, a kernel
level with csrc/int4a8.c's int16 kernel on tiles), through the decode plan and the forward: the plan passes each
layer's tiles to the chain (made together in one buffer when the plan is built), gives bitwise the forward's tokens
and scores, and falls back to the forward when the tiles or what they were made from change in the middle of a
generate (an in-place change to the weight, scale or zero point, tiles replaced, the layout turned off)."""
from __future__ import annotations

import pytest
import torch

from loom.generation.decode_plan import DecodePlan
from loom.kernels import build, ops, policy
from loom.quantization import WeightOnlyConfig, quantize_
from loom.quantization.linear import Int4Linear
from test_decode_plan import _Changer, _generate, _ids, _same
from test_decode_plan_quantized import _both
from test_fused_decode import _model

needs_tiles = pytest.mark.skipif(not (build.available() and ops.int4_tiles_int16()),
                                 reason="needs loom's kernels (the tiled int16 kernel)")


def _int4(symmetric=False, head=False, dtype=torch.float32):
    model = _model("llama", dtype, hidden_size=64, intermediate_size=96)
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2)
    quantize_(model, WeightOnlyConfig(bits=4, group_size=32, symmetric=symmetric, skip_output_embeddings=not head))
    return model


def _layers(model):
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


@needs_tiles
@pytest.mark.parametrize("rows,padded", [(1, False), (3, True)])
@pytest.mark.parametrize("symmetric,head,dtype", [(False, False, torch.float32), (True, True, torch.float32),
                                                  (False, True, torch.bfloat16)])
def test_plan_reads_the_tiles_and_equals_the_forward(symmetric, head, dtype, rows, padded, monkeypatch):
    built = []
    build_plan = DecodePlan.build.__func__

    def recording(cls, *args):
        plan = build_plan(cls, *args)
        built.append(plan)
        return plan
    monkeypatch.setattr(DecodePlan, "build", classmethod(recording))
    mask = torch.ones(rows, 7, dtype=torch.long)
    if padded:
        mask[0, :2] = mask[2, :4] = 0
    kw = dict(input_ids=_ids(rows), attention_mask=mask, max_new_tokens=12)
    a, b, steps = _both(lambda: _int4(symmetric, head, dtype), monkeypatch, **kw)
    if rows > 1 and dtype is torch.bfloat16 and not policy.batched_bf16():  # no plan for batched bf16 at this level
        assert _same(a, b) and steps == 0 and built[0] is None
        return
    assert _same(a, b) and steps == 11 * 2
    plan = built[0]
    quant = [q for lt in plan.chain.layers for q in lt.quant if q is not None]
    assert len(quant) == 14 and all(q.kind == "int4" and q.tiles is not None for q in quant)
    layers = _layers(plan.model)
    assert all(m.tiles_current() for m in layers) and len(layers) == 14 + head
    # one buffer for every layer's tiles (huge pages where Linux allows)
    assert len({m._a8.untyped_storage().data_ptr() for m in layers}) == 1
    assert {id(q.tiles) for q in quant} <= {id(m._a8) for m in layers}


@needs_tiles
def test_forward_at_decode_sizes_reads_tiles_and_stays_within_the_int16_bound():
    model = _int4()
    layer = model.model.layers[0].mlp.down_proj
    assert layer.wants_tiles() and layer._a8 is None
    x = torch.randn(5, layer.in_features) * 3
    with torch.no_grad():
        y = layer(x)
    assert layer.tiles_current()
    w = ops.int4_dequantize_reference(layer.weight, layer.weight_scale, layer.zero_point).double()
    assert layer.bias is None  # Llama's projections: the product alone
    exact = x.double() @ w.T
    bound = x.abs().amax(1, keepdim=True).double() / 65534 * w.abs().sum(1) + 1e-6 * (x.abs().double() @ w.abs().T)
    assert ((y.double() - exact).abs() <= bound).all()
    layer.tiles_for_decode = False  # the saved layout's kernel: same bound, tiles no longer read or remade
    with torch.no_grad():
        y2 = layer(x)
    assert ((y2.double() - exact).abs() <= bound).all() and not torch.equal(y, y2)  # another summation order


CHANGES = ["weight in place", "scale in place", "zero in place", "tiles replaced", "tiles off"]


@needs_tiles
@pytest.mark.parametrize("what", CHANGES)
def test_tiles_or_their_sources_changed_mid_generate_fall_back(what, monkeypatch):
    """Changed at the 4th streamed token: plan steps before it, the forward after (which remakes stale tiles), and
    the tokens and scores of a generate that never planned."""
    def change_of(model):
        m = model.model.layers[1].mlp.up_proj

        def change():
            with torch.no_grad():
                if what == "weight in place":
                    m.weight[:3] ^= 0x5A
                elif what == "scale in place":
                    m.weight_scale.mul_(2)
                elif what == "zero in place":
                    m.weight_zero.fill_(3)
                elif what == "tiles replaced":  # another tensor of the layout (the forward reads it, stamp unchanged)
                    m._a8 = torch.zeros_like(m._a8)
                else:
                    m.tiles_for_decode = False
        return change

    results = []
    for plan in (True, False):
        model = _int4()
        with torch.random.fork_rng():
            results.append(_generate(model, monkeypatch, plan, input_ids=_ids(), max_new_tokens=10,
                                     streamer=_Changer(4, change_of(model))))
    (a, steps), (b, _) = results
    assert _same(a, b) and steps == 2 * 2
