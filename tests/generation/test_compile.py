"""generate(..., cache_implementation="static", compile=True): the decode step is captured once, as one graph, and
gives the eager tokens; the static cache's positions and mask stay tensors; the eager dynamic path stays mask-free."""
from __future__ import annotations

import functools
import time

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import loom
from gen_helpers import model_pair, prompts

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {name: model_pair(tmp_path_factory, name, pad_token_id=0)[0] for name in ("llama", "gpt2", "mistral")}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compilations: nothing cached from an earlier test's graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compile_with(monkeypatch, backend):
    """Make the Decoder's `torch.compile(model, dynamic=False)` use `backend` (a counter around aot_eager: graph
    capture and functionalisation without inductor's minutes of C++ codegen)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))


def _generate(model, ids, mask=None, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=None, **kw)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("padded", [False, True])
def test_compiled_static_decode_compiles_once_and_matches_eager(models, name, padded, monkeypatch):
    model = models[name]
    ids, mask = prompts([6, 3], seed=21) if padded else prompts([5], seed=22)
    mask = mask if padded else None
    eager = _generate(model, ids, mask)
    counter = CompileCounterWithBackend("aot_eager")
    _compile_with(monkeypatch, counter)
    compiled = _generate(model, ids, mask, cache_implementation="static", compile=True)
    assert torch.equal(compiled, eager)
    # 19 compiled decode steps (the prefill runs eagerly): one graph, captured once, no breaks, no recompiles
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled for {NEW_TOKENS - 1} decode steps"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_static_decode_with_inductor(models):
    """The default backend end to end (the tiny model compiles in seconds on 2 cores)."""
    model = models["llama"]
    ids, mask = prompts([7, 4], seed=23)
    eager = _generate(model, ids, mask)
    start = time.perf_counter()
    compiled = _generate(model, ids, mask, cache_implementation="static", compile=True)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert time.perf_counter() - start < 300  # a recompile per position would take minutes


def test_static_cache_forward_follows_seen_positions(models):
    """Forwards without cache_position continue from the tokens the static cache has seen, like a dynamic cache."""
    model = models["llama"]
    ids = torch.tensor([[5, 9, 14, 3, 8]])
    static = loom.StaticCache(model.config, max_cache_len=8)
    dynamic = loom.DynamicCache()
    with torch.no_grad():
        for chunk in (ids[:, :3], ids[:, 3:4], ids[:, 4:]):
            got = model(chunk, past_key_values=static, use_cache=True).logits
            want = model(chunk, past_key_values=dynamic, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert static.get_seq_length() == dynamic.get_seq_length() == 5
    static.reset()
    assert static.get_seq_length() == 0


def test_static_cache_overflow_names_max_cache_len(models):
    model = models["llama"]
    cache = loom.StaticCache(model.config, max_cache_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match=r"position 4 does not fit in max_cache_len=4.*larger"):
        model(torch.tensor([[5, 9, 14, 3, 8]]), past_key_values=cache, use_cache=True)


def test_gpt2_static_cache_past_n_positions_is_a_clear_error(models):
    model = models["gpt2"]  # n_positions=64
    cache = loom.StaticCache(model.config, max_cache_len=80)
    with torch.no_grad(), pytest.raises(ValueError, match="longer than this model's n_positions=64"):
        model(torch.tensor([[5]]), past_key_values=cache, use_cache=True, cache_position=torch.tensor([70]))


def test_static_mask_is_whole_length_and_dynamic_decode_is_mask_free(models, monkeypatch):
    """The static cache sees one (B, 1, 1, max_cache_len) mask shape at every step; the dynamic cache's unpadded
    decode passes no mask at all (SDPA's mask-free path)."""
    import loom.models.common as common

    seen = []
    real = common.sdpa

    def spy(q, k, v, mask, *args, **kwargs):
        seen.append(None if mask is None else tuple(mask.shape))
        return real(q, k, v, mask, *args, **kwargs)

    def fused_spy(name, mask_at):  # a decode step's fused kernels (loom's kernels on) take the same mask
        fused = getattr(common.ops, name)

        def run(*args):
            seen.append(None if args[mask_at] is None else tuple(args[mask_at].shape))
            return fused(*args)
        monkeypatch.setattr(common.ops, name, run)

    monkeypatch.setattr(common, "sdpa", spy)
    fused_spy("rope_cache_attention", 9)
    fused_spy("decode_layer_attention", 22)
    from loom.kernels.chain import DecodeChain

    chain_run = DecodeChain.run

    def chain_spy(self, cos, sin, pos, mask=None, length=None):  # the decode plan's layers (loom/generation/decode_plan.py)
        seen.extend([None if mask is None else (mask.shape[0], 1, 1, length or pos + 1)] * self.n)
        return chain_run(self, cos, sin, pos, mask, length)
    monkeypatch.setattr(DecodeChain, "run", chain_spy)
    model, ids = models["llama"], torch.tensor([[5, 9, 14]])
    layers = model.config.num_hidden_layers
    _generate(model, ids)
    assert seen[:layers] == [None] * layers  # prefill: SDPA's is_causal
    assert set(seen[layers:]) == {None}
    seen.clear()
    _generate(model, ids, cache_implementation="static")
    assert set(seen) == {(1, 1, 3, 3 + NEW_TOKENS - 1)} | {(1, 1, 1, 3 + NEW_TOKENS - 1)}
    assert seen[layers:] == [(1, 1, 1, 3 + NEW_TOKENS - 1)] * (layers * (NEW_TOKENS - 1))
