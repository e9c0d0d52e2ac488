"""The decode chain's one-call step (csrc/decode.c loom_decode_chain_layers): float32 dense layers with SiLU run every
layer of a step in one C call, the activation and product between layers in C (csrc/silu.c loom_silu_mul) with
torch's silu_ and mul_ bits. The SiLU is checked against torch's over a sample of every float32 bit pattern and at
the lengths whose tails torch computes with its scalar loop; the one-call step against the per-layer calls (torch's
ops between them) and the model's forward, with and without a head in the chain, where torch would split the
activation over threads (the per-layer path then), and with an intermediate size that leaves a scalar tail."""
from __future__ import annotations

import pytest
import torch
from loomtest import kernels_on

from loom.generation.decode_plan import DecodePlan
from loom.kernels import build, chain
from loom.kernels.chain import DecodeChain
from loom.quantization import WeightOnlyConfig, quantize_
from test_decode_plan import KW, _ids, _same
from test_fused_decode import _model

pytestmark = pytest.mark.skipif(not kernels_on(), reason="the chain needs loom's C kernels")


def _silu_mul(x, u, block):
    got = x.clone()
    build.library().loom_silu_mul(got.data_ptr(), u.data_ptr(), got.numel(), block)
    return got


def test_silu_block_follows_torchs_cpu_capability():
    """torch's CPU wheels run silu in AVX512 or AVX2 loops (or DEFAULT's scalar one): the kernel follows each, so the
    one-call step is on wherever the kernels are."""
    want = {"AVX512": 32, "AVX2": 16, "DEFAULT": 0}[torch.backends.cpu.get_cpu_capability()]
    assert chain.silu_block() == want


def test_silu_mul_is_torchs_on_a_sample_of_every_float32():
    """Every 257th bit pattern of the 2^32 (NaNs compared as NaNs), times a random up projection, against torch's
    silu_ and mul_ on one thread (one loop over the whole tensor, as the chain's call is)."""
    x = (torch.arange(0, 2 ** 32, 257, dtype=torch.int64) - 2 ** 31).to(torch.int32).view(torch.float32)
    x = x[: x.numel() - 5]
    u = torch.rand(x.numel(), generator=torch.Generator().manual_seed(1)) * 4 - 2
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = chain.silu_(x.clone()).mul_(u)
    finally:
        torch.set_num_threads(before)
    got = _silu_mul(x, u, chain.silu_block())
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), x[~same][:8].tolist()


@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 2048, 2048 + 13])
def test_silu_mul_tails_are_torchs(n):
    """Lengths around torch's vector-loop step: the values past the last whole step take libm's expf on both sides."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 8
    x[::5] = -1.999998688697815  # an input where SLEEF's expf and libm's differ in the last bit
    u = torch.randn(n, generator=g)
    assert torch.equal(_silu_mul(x, u, chain.silu_block()).view(torch.int32),
                       chain.silu_(x.clone()).mul_(u).view(torch.int32))


def _counting(monkeypatch):
    """{"layers": one-call steps, "step": per-layer calls} of every chain built from now on."""
    calls = {"layers": 0, "step": 0}
    init = DecodeChain.__init__

    def counting_init(self, *args, **kw):
        init(self, *args, **kw)
        for key, attr in (("layers", "_layers_fn"), ("step", "_fn")):
            def counted(*a, _f=getattr(self, attr), _k=key):
                calls[_k] += 1
                return _f(*a)
            setattr(self, attr, counted)
    monkeypatch.setattr(DecodeChain, "__init__", counting_init)
    return calls


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_one_call_step_equals_per_layer_calls_and_the_forward(rows, quantized, monkeypatch):
    """Tokens and scores bitwise against the per-layer calls (the fused path turned off) and the forward (no plan);
    with an int8 head the chain's call writes the logits too. Intermediate size 100: a scalar tail of 4 values."""
    model = _model("llama", torch.float32, intermediate_size=100)
    if quantized:
        quantize_(model, WeightOnlyConfig(bits=8, skip_output_embeddings=False))
    kw = dict(input_ids=_ids(rows), max_new_tokens=24, **KW)
    calls = _counting(monkeypatch)
    fused = model.generate(**kw)
    assert calls["layers"] == 23 and calls["step"] == 0  # one call a step after the prefill
    monkeypatch.setattr(chain, "silu_block", lambda: None)
    per_layer = model.generate(**kw)
    assert calls["layers"] == 23 and calls["step"] == 23 * (model.config.num_hidden_layers + 1)
    monkeypatch.setattr(DecodePlan, "build", classmethod(lambda cls, *args: None))
    forward = model.generate(**kw)
    assert _same(fused, per_layer) and _same(fused, forward)


def test_an_activation_torch_would_split_over_threads_takes_the_per_layer_calls(two_threads, monkeypatch):
    """rows * intermediate >= torch's grain (32768 values): torch's silu_ on two threads runs in chunks with scalar
    tails of their own, so where the step runs with torch on two threads (no handoff) it goes layer by layer; inside
    the decode loop's handoff torch has one thread and the one call serves. Both bitwise the forward."""
    from loom.kernels import threads
    model = _model("llama", torch.float32, intermediate_size=2048)
    kw = dict(input_ids=_ids(16), max_new_tokens=6, **KW)
    calls = _counting(monkeypatch)
    handoff = model.generate(**kw)
    assert calls == {"layers": 5, "step": 0}
    with monkeypatch.context() as m:
        m.setattr(threads, "kernels_own_threads", lambda: __import__("contextlib").nullcontext())
        two = model.generate(**kw)
    assert calls == {"layers": 5, "step": 5 * (model.config.num_hidden_layers + 1)}
    monkeypatch.setattr(DecodePlan, "build", classmethod(lambda cls, *args: None))
    forward = model.generate(**kw)
    assert _same(handoff, forward) and _same(two, forward)
