"""Runs of greedy steps in one C call (csrc/decode.c loom_decode_chain_greedy, DecodePlan.greedy): for one unpadded
row of a float32 or bfloat16 model the decode plan runs whole with SiLU, a quiet generate asking nothing of a step but
its token runs up to 64 steps per call: embedding row, layers (their SiLU and product in C with torch's bits,
csrc/silu.c), final norm and head, argmax, EOS. Checked: the SiLU against torch's over a sample of every float32 bit
pattern, every bfloat16 value, and at the lengths whose tails torch computes with its scalar loop; generations
(tokens, and the cache left behind) against the plan's steps and the model's forward with a dense, int8 and int4
head in both dtypes, across runs, stopping at an EOS inside a run and at the last token of one; every case that keeps
the steps (scores, a streamer, sampling, a processor, two rows, dynamic rotary scaling, a hooked head); the rotary
tables of a run against each position's own."""
from __future__ import annotations

import pytest
import torch
from loomtest import kernels_on

from loom.generation.decode_plan import DecodePlan
from loom.kernels import build, chain
from loom.kernels.chain import DecodeChain
from loom.quantization import WeightOnlyConfig, quantize_
from test_decode_plan import _ids
from test_fused_decode import _model

pytestmark = pytest.mark.skipif(not kernels_on(), reason="the chain needs loom's C kernels")


def _silu_mul(x, u, block):
    got = x.clone()
    build.library().loom_silu_mul(got.data_ptr(), u.data_ptr(), got.numel(), block)
    return got


def test_silu_block_follows_torchs_cpu_capability():
    """torch's CPU wheels run silu in AVX512 or AVX2 loops (or DEFAULT's scalar one): the kernel follows each, so
    greedy runs are on wherever the kernels are."""
    cap = torch.backends.cpu.get_cpu_capability()
    assert chain.silu_block(torch.float32) == {"AVX512": 32, "AVX2": 16, "DEFAULT": 0}[cap]
    assert chain.silu_block(torch.bfloat16) == {"AVX512": 64, "AVX2": 32, "DEFAULT": 0}[cap]


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


@pytest.mark.parametrize("n", [1, 33, 63, 64, 65, 1000, 65536 - 1])
def test_silu_mul_bf16_is_torchs_for_every_bfloat16(n):
    """Every bfloat16 value but the NaNs, in runs of n (tails past torch's 64- or 32-value steps included)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[~every.isnan()]
    u = torch.randn(every.numel(), generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    lib, block = build.library(), chain.silu_block(torch.bfloat16)
    for at in range(0, every.numel(), n):
        x, w = every[at:at + n].clone(), u[at:at + n].clone()
        got = x.clone()
        lib.loom_silu_mul_bf16(got.data_ptr(), w.data_ptr(), got.numel(), block)
        want = chain.silu_(x.clone()).mul_(w)
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert bool(same.all()), x[~same][:8].tolist()


def _counting(monkeypatch):
    """The greedy runs (C calls) of every plan from now on."""
    calls = [0]
    greedy = DecodeChain.greedy

    def counted(self, *args):
        calls[0] += 1
        return greedy(self, *args)
    monkeypatch.setattr(DecodeChain, "greedy", counted)
    return calls


def _without_runs(model, kw, monkeypatch):
    """(the plan's steps, the forward) for the same generate: greedy runs off, then the plan off too."""
    with monkeypatch.context() as m:
        m.setattr(chain, "silu_block", lambda dtype=None: None)
        steps = model.generate(**kw)
        m.setattr(DecodePlan, "build", classmethod(lambda cls, *args: None))
        forward = model.generate(**kw)
    return steps, forward


def _same_cache(a, b) -> bool:
    n = a.get_seq_length()
    return n == b.get_seq_length() and all(
        torch.equal(x[..., :n, :], y[..., :n, :]) for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values]))


GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["dense", "int8", "int4"])
def test_greedy_runs_equal_the_steps_and_the_forward(head, dtype, monkeypatch):
    """150 new tokens: the prefill's, one plan step, then runs (4 tokens, then up to 64); intermediate size 100
    leaves the SiLU a scalar tail (96 for int4's groups of 32). Tokens and the cache's keys and values bitwise the
    plan's steps' and the forward's."""
    model = _model("llama", dtype, intermediate_size=96 if head == "int4" else 100, max_position_embeddings=256)
    if head != "dense":
        cfg = dict(bits=8) if head == "int8" else dict(bits=4, group_size=32, symmetric=True)
        quantize_(model, WeightOnlyConfig(**cfg, skip_output_embeddings=False))
    kw = dict(input_ids=_ids(1), max_new_tokens=150, **GREEDY)
    calls = _counting(monkeypatch)
    runs = model.generate(**kw)
    assert calls[0] >= 3
    steps, forward = _without_runs(model, kw, monkeypatch)
    assert runs.sequences.tolist() == steps.sequences.tolist() == forward.sequences.tolist()
    assert _same_cache(runs.cache, steps.cache) and _same_cache(runs.cache, forward.cache)
    assert runs.cache.get_seq_length() == 7 + 150 - 1


def test_runs_are_as_long_as_greedy_seconds_allows(monkeypatch):
    """A run takes about GREEDY_SECONDS (Python, Ctrl-C included, comes back that often on any model): none left
    means a token a run; the first run has GREEDY_FIRST tokens."""
    from loom.generation import decode_plan
    model = _model("llama", torch.float32, max_position_embeddings=256)
    kw = dict(input_ids=_ids(1), max_new_tokens=40, **GREEDY)
    sizes = []
    greedy = DecodeChain.greedy

    def sized(self, *args):
        sizes.append(args[5].numel())
        return greedy(self, *args)
    monkeypatch.setattr(DecodeChain, "greedy", sized)
    monkeypatch.setattr(decode_plan, "GREEDY_SECONDS", 0.0)
    one = model.generate(**kw)
    assert sizes == [4] + [1] * 34
    sizes.clear()
    monkeypatch.setattr(decode_plan, "GREEDY_SECONDS", 60.0)
    whole = model.generate(**kw)
    assert sizes == [4, 34]
    steps, _ = _without_runs(model, kw, monkeypatch)
    assert one.sequences.tolist() == whole.sequences.tolist() == steps.sequences.tolist()


@pytest.mark.parametrize("at", [6, 20, 70])
def test_an_eos_inside_a_run_or_at_its_end_stops_there(at, monkeypatch):
    """EOS = the token the free generate makes at `at` (new tokens 3..6 are the first run's, 7..70 the second's)."""
    model = _model("llama", torch.float32, max_position_embeddings=256)
    free = model.generate(input_ids=_ids(1), max_new_tokens=100, **GREEDY).sequences[0]
    eos = int(free[7 + at - 1])
    first = (free[7:] == eos).nonzero()[0].item() + 1  # the first time it appears among the new tokens
    kw = dict(input_ids=_ids(1), max_new_tokens=100, **{**GREEDY, "eos_token_id": eos})
    runs = model.generate(**kw)
    steps, forward = _without_runs(model, kw, monkeypatch)
    assert runs.sequences.shape[1] == 7 + first
    assert runs.sequences.tolist() == steps.sequences.tolist() == forward.sequences.tolist()
    assert _same_cache(runs.cache, forward.cache)


def test_looms_text_streamer_gets_each_runs_tokens_one_by_one(monkeypatch):
    """loom's TextStreamer over a loom tokenizer printing to a plain stdout (the `loom` command line) leaves the runs
    on and is fed each run's tokens after it, one put per token as the steps feed it: the same text, printed as the
    steps print it."""
    import io
    import sys

    from loom.generation.streamers import TextStreamer
    from test_decode_plan_quiet import _loom_tokenizer
    model = _model("llama", torch.float32, max_position_embeddings=256)
    tok = _loom_tokenizer(model.config.vocab_size)
    printed, puts = [], []

    def generate():
        out = io.BytesIO()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="utf-8", write_through=True))
        streamer = TextStreamer(tok, skip_prompt=True)
        put = streamer.put  # counted through an instance attribute: the streamer's class stays loom's TextStreamer
        streamer.put = lambda value: puts.append(tuple(value.shape)) or put(value)
        seqs = model.generate(input_ids=_ids(1), max_new_tokens=40, streamer=streamer, **GREEDY).sequences
        printed.append(out.getvalue().decode())
        return seqs

    calls = _counting(monkeypatch)
    runs = generate()
    ran = calls[0]
    assert ran >= 2 and puts == [(1, 7)] + [(1,)] * 40
    puts.clear()
    monkeypatch.setattr(chain, "silu_block", lambda dtype=None: None)
    steps = generate()
    assert calls[0] == ran and puts == [(1, 7)] + [(1,)] * 40  # no run this time
    assert runs.tolist() == steps.tolist() and printed[0] == printed[1]
    assert printed[0] == tok.decode(runs[0, 7:].tolist()) + "\n"


@pytest.mark.parametrize("case", ["scores", "streamer", "sampling", "processor", "two rows", "dynamic rope",
                                  "hooked head"])
def test_the_steps_run_where_a_step_is_asked_more_than_its_token(case, monkeypatch):
    from loom.generation.streamers import BaseStreamer
    overrides = {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}} if case == "dynamic rope" else {}
    model = _model("llama", torch.float32, max_position_embeddings=256, **overrides)
    kw = dict(input_ids=_ids(2 if case == "two rows" else 1), max_new_tokens=20, **GREEDY)
    if case == "scores":
        kw["output_scores"] = True
    elif case == "streamer":
        kw["streamer"] = BaseStreamer()
        kw["streamer"].put = kw["streamer"].end = lambda *a: None
    elif case == "sampling":
        kw.update(do_sample=True, top_k=5, generator=None)
        torch.manual_seed(0)
    elif case == "processor":
        kw["repetition_penalty"] = 1.3
    elif case == "hooked head":
        model.lm_head.register_forward_hook(lambda *a: None)
    calls = _counting(monkeypatch)
    model.generate(**kw)
    assert calls[0] == 0


def test_a_runs_rotary_tables_are_each_positions_own():
    """The run's tables come from one call over its positions; the steps' from one call per position."""
    from loom.models.rope import RotaryEmbedding
    model = _model("llama", torch.float32, max_position_embeddings=4096,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    rope = [m for m in model.modules() if isinstance(m, RotaryEmbedding)][0]
    for start in (0, 7, 1000, 3000):
        cos, sin = rope(torch.arange(start, start + 64)[None], torch.float32)
        for i in range(64):
            c, s_ = rope(torch.tensor([[start + i]]), torch.float32)
            assert torch.equal(cos[:, :, i:i + 1], c) and torch.equal(sin[:, :, i:i + 1], s_)


def test_bad_greedy_arguments_get_named_errors(monkeypatch):
    """A token outside the embedding (IndexError, from C before any memory is read), out / eos not int64, rotary rows
    of the wrong shape, positions past the caches, an embedding the chain cannot read (ValueError naming it)."""
    model = _model("llama", torch.float32, max_position_embeddings=256)
    seen = {}
    greedy = DecodeChain.greedy

    def keep(self, embed, cos, sin, pos, first, out, eos):
        seen["chain"] = self
        with pytest.raises(IndexError, match="outside the embedding's 99 rows"):
            greedy(self, embed, cos, sin, pos, 99 + 5, out.clone(), eos)
        with pytest.raises(ValueError, match="out and eos must be contiguous 1-D int64"):
            greedy(self, embed, cos, sin, pos, first, out.to(torch.int32), eos)
        with pytest.raises(ValueError, match="cos and sin must be"):
            greedy(self, embed, cos[:-1], sin[:-1], pos, first, out, eos)
        with pytest.raises(ValueError, match="do not fit the caches"):
            greedy(self, embed, cos, sin, self._capacity, first, out, eos)
        with pytest.raises(ValueError, match="greedy_fits"):
            greedy(self, embed.to(torch.float64), cos, sin, pos, first, out, eos)
        return greedy(self, embed, cos, sin, pos, first, out, eos)
    monkeypatch.setattr(DecodeChain, "greedy", keep)
    model.generate(input_ids=_ids(1), max_new_tokens=10, **GREEDY)
    assert "chain" in seen
