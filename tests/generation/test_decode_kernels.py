"""loom's C decode-step ops against torch: single-query attention (loom.models.common.sdpa at q_len 1), RMSNorm,
and the thread handoff of the decode loop (torch on one thread while loom's kernels keep the others)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import loom
from loom.kernels import build, ops, threads
from loom.kernels.policy import MAX_ROWS, decode_on_kernels
from loom.models.common import RMSNorm, sdpa

kernels_carry_decode = decode_on_kernels
pytestmark = pytest.mark.skipif(not build.available(), reason="loom's C kernels need Linux x86-64 with "
                                "AVX2/FMA/F16C and a C compiler")


def _qkv(B, H, Hkv, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as attention produces it: the first H heads of a rotated (B, H + Hkv, 1, D) tensor, a strided view
    q = torch.randn(B, H + Hkv, 1, D, generator=g).to(dtype)[:, :H]
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return q, k, v


def _torch_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("B,H,Hkv,L,D,masked", [
    (1, 12, 4, 129, 64, False),  # GQA, one row: runs on the caller alone
    (3, 8, 8, 37, 36, True),  # head dim not a multiple of 8, a padding mask per row
    (2, 4, 2, 5000, 64, True),  # more keys than the kernel's stack buffer
    (8, 12, 4, 700, 64, False),  # enough work for the thread pool
    (2, 4, 1, 1, 16, False),  # a single key
])
def test_single_query_attention_matches_sdpa(B, H, Hkv, L, D, masked):
    q, k, v = _qkv(B, H, Hkv, L, D, torch.float32)
    mask = torch.rand(B, 1, 1, L, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    if mask is not None:
        mask[:, ..., 0] = True  # every row attends somewhere, as attention_mask_for guarantees
    with torch.no_grad():
        got = sdpa(q, k, v, mask, False)
    want = _torch_sdpa(q, k, v, mask)
    assert got.shape == want.shape == (B, H, 1, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the layout the output projection wants: (B, 1, H, D) contiguous behind the (B, H, 1, D) view
    assert got.transpose(1, 2).is_contiguous()


def test_single_query_attention_bf16_rounds_once():
    q, k, v = _qkv(2, 8, 2, 300, 64, torch.bfloat16)
    with torch.no_grad():
        got = sdpa(q, k, v, None, False)
    want = _torch_sdpa(q, k, v, None)  # fp32 math on the same bf16 inputs
    assert got.dtype is torch.bfloat16
    torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=2 ** -7, atol=1e-3)


def test_masked_keys_contribute_nothing():
    q, k, v = _qkv(2, 4, 2, 50, 32, torch.float32)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[0, ..., 10:] = False
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 10:] = float("nan")  # whatever sits in masked slots (a static cache's unused tail) must not leak
    v2[0, :, 10:] = float("inf")
    with torch.no_grad():
        got = sdpa(q, k2, v2, mask, False)
    want = _torch_sdpa(q[:1], k[:1, :, :10], v[:1, :, :10], None)
    torch.testing.assert_close(got[:1], want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("case", ["causal", "grad", "float_mask", "two_queries", "per_head_mask"])
def test_attention_falls_back_to_torch(case, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the C kernel must not take this call")

    monkeypatch.setattr(ops, "decode_attention", boom)
    q, k, v = _qkv(1, 4, 2, 9, 16, torch.float32)
    mask, is_causal = None, False
    if case == "causal":
        is_causal = True
    elif case == "float_mask":
        mask = torch.zeros(1, 1, 1, 9)
    elif case == "two_queries":
        q = torch.randn(1, 4, 2, 16)
    elif case == "per_head_mask":
        mask = torch.ones(1, 4, 1, 9, dtype=torch.bool)
    with torch.set_grad_enabled(case == "grad"):
        got = sdpa(q.requires_grad_(case == "grad"), k, v, mask, is_causal)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [96, 37])  # a whole number of 16-lane blocks, and a tail
def test_rms_norm_kernel_matches_reference(dtype, n):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, generator=g) * 0.2 + 1
    x = (torch.randn(3, 5, n, generator=g) * 4).to(dtype)
    ours, ref = RMSNorm(n, eps=1e-5).to(dtype), LlamaRMSNorm(n, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ref.weight.copy_(weight)
        got, want = ours(x), ref(x)
    if dtype is torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # normalised in fp32 and rounded, then times the bf16 weight and rounded: at most 1 bf16 ulp apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)


def test_rms_norm_training_uses_torch(monkeypatch):
    monkeypatch.setattr(ops, "rms_norm", lambda *a: (_ for _ in ()).throw(AssertionError("C kernel used")))
    norm = RMSNorm(16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    norm(x).sum().backward()  # autograd needs torch's op
    assert x.grad is not None


def test_rms_norm_kernel_on_the_pool(two_threads):
    norm = RMSNorm(200)  # rows split over the pool in blocks of ~64K values
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(3000, 200)
        torch.testing.assert_close(norm(x), torch.rms_norm(x, (200,), norm.weight, 1e-6), rtol=1e-6, atol=1e-6)


def _tiny_llama() -> loom.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = loom.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return loom.LlamaForCausalLM(cfg).eval()


class _Spy:
    """A logits processor that records torch's and the kernels' thread counts at each step (and can fail)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.seen, self.fail_at = [], fail_at

    def __call__(self, input_ids, scores):
        self.seen.append((torch.get_num_threads(), threads.pool_threads()))
        self.spinning = threads.handoffs_in_force() > 0  # pool helpers spin between jobs only meanwhile
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise RuntimeError("stop here")
        return scores


def test_decode_loop_runs_torch_on_one_thread(two_threads):
    model, ids = _tiny_llama(), torch.tensor([[1, 5, 9, 3]])
    assert kernels_carry_decode(model, 1)
    spy = _Spy()
    out = model.generate(ids, max_new_tokens=4, do_sample=False, logits_processor=[spy])
    # the prefill's logits are processed inside the loop too: every step after the prefill sees the handoff
    assert spy.seen == [(1, 2)] * 4 and spy.spinning
    assert torch.get_num_threads() == 2 and threads.pool_threads() == 2 and threads.handoffs_in_force() == 0
    # the same tokens as without the handoff
    torch.set_num_threads(1)
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, do_sample=False))


def test_thread_count_restored_after_an_error(two_threads):
    model = _tiny_llama()
    with pytest.raises(RuntimeError, match="stop here"):
        model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, logits_processor=[_Spy(fail_at=2)])
    assert torch.get_num_threads() == 2 and threads.pool_threads() == 2


def test_no_handoff_when_a_matmul_runs_outside_loom_kernels(two_threads):
    model = _tiny_llama()
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: None)  # hooked: torch runs it
    assert not kernels_carry_decode(model, 1)
    spy = _Spy()
    model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=2, logits_processor=[spy])
    assert spy.seen == [(2, 2)] * 2
    assert not kernels_carry_decode(_tiny_llama(), MAX_ROWS + 1)
    replaced = _tiny_llama()  # a replaced forward may run anything, so no handoff either
    gate = replaced.model.layers[1].mlp.gate_proj
    gate.forward = lambda x: torch.nn.functional.linear(x, gate.weight)
    assert kernels_carry_decode(_tiny_llama(), 1) and not kernels_carry_decode(replaced, 1)


def test_concurrent_handoffs_each_restore_their_own_thread(two_threads):
    import threading

    inside, release, seen = threading.Event(), threading.Event(), []

    def other():
        torch.set_num_threads(2)
        with threads.kernels_own_threads():
            seen.append((torch.get_num_threads(), threads.pool_threads()))
            inside.set()
            release.wait(10)
        seen.append((torch.get_num_threads(), threads.pool_threads()))

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with threads.kernels_own_threads():
        assert torch.get_num_threads() == 1 and threads.pool_threads() == 2
    assert torch.get_num_threads() == 2 and threads.pool_threads() == 2  # restored here while the other still decodes
    release.set()
    t.join(10)
    assert seen == [(1, 2), (2, 2)]
    assert torch.get_num_threads() == 2


def test_compiled_model_keeps_the_operators_in_one_graph():
    """The kernels are operators with fake implementations, so torch.compile traces through them: no graph breaks,
    and the compiled decode step calls loom's operators, with the eager results."""
    import torch._dynamo

    model, ids = _tiny_llama(), torch.tensor([[1, 5, 9, 3]])
    step = torch.tensor([[7]])
    with torch.no_grad():
        cache = loom.DynamicCache()
        model(ids, past_key_values=cache, use_cache=True)
        want = model(step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

        def decode(c):
            return model(step, past_key_values=c, use_cache=True, logits_to_keep=1).logits

        cache = loom.DynamicCache()
        model(ids, past_key_values=cache, use_cache=True)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(decode)(cache)
        graph_ops = {str(node.target).removesuffix(".default") for g in explained.graphs for node in g.graph.nodes}
    assert explained.graph_break_count == 0, explained.break_reasons
    assert {"loom.dense_linear", "loom.rms_norm", "loom.decode_attention"} <= graph_ops
    with torch.no_grad():
        cache = loom.DynamicCache()
        model(ids, past_key_values=cache, use_cache=True)
        got = torch.compile(decode, backend="aot_eager", fullgraph=True)(cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _quantized_llama(**kw):
    from loom.quantization import WeightOnlyConfig, quantize_

    model = _tiny_llama()
    quantize_(model, WeightOnlyConfig(**kw))
    return model


class _ForwardSpy:
    """A forward pre-hook on the first layer recording torch's and the kernels' thread counts for each call."""

    def __init__(self, model) -> None:
        self.seen = []
        model.model.layers[0].register_forward_pre_hook(lambda *a: self.seen.append(
            (a[1][0].shape[1], torch.get_num_threads(), threads.pool_threads())))


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=32), dict(bits=8), dict(bits=4, group_size=32,
                                                                                 skip_output_embeddings=False)])
def test_prefill_hands_torch_one_thread_where_the_kernels_carry_it(two_threads, kw):
    """A quantized model's prefill (its blocked GEMMs, loom::flash_attention, the head on the last rows) runs torch's
    own ops on one thread while the kernels keep two, as its decode does; same tokens and scores as without."""
    from loom.kernels import policy

    model, ids = _quantized_llama(**kw), torch.randint(1, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    assert policy.prefill_on_kernels(model, 40, 2)
    spy = _ForwardSpy(model)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert spy.seen[0] == (20, 1, 2), spy.seen  # the prefill, handed off
    assert torch.get_num_threads() == 2 and threads.pool_threads() == 2 and threads.handoffs_in_force() == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy, "prefill_on_kernels", lambda *a: False)
        spy.seen.clear()
        ref = model.generate(ids, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        assert spy.seen[0] == (20, 2, 2)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def test_no_prefill_handoff_where_torch_carries_a_matmul(two_threads):
    from loom.kernels import policy

    ids = torch.randint(1, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    plain = _tiny_llama()  # float Linears: torch's GEMM at prefill sizes
    assert not policy.prefill_on_kernels(plain, 20, 1)
    spy = _ForwardSpy(plain)
    plain.generate(ids, max_new_tokens=1, do_sample=False)
    assert spy.seen == [(20, 2, 2)]
    model = _quantized_llama(bits=4, group_size=32)
    assert policy.prefill_on_kernels(model, 20, 1) and not policy.prefill_on_kernels(model, MAX_ROWS, 1)
    spy = _ForwardSpy(model)
    # a padded batch attends through SDPA with a mask: torch keeps its threads
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    model.generate(ids.expand(2, -1), attention_mask=mask, max_new_tokens=1, do_sample=False)
    assert spy.seen == [(20, 2, 2)]
    # a group size the blocked GEMM does not take (dequantized, torch's GEMM), and a float Linear left in a layer
    assert not policy.prefill_on_kernels(_quantized_llama(bits=4, group_size=16), 20, 1)
    partly = _quantized_llama(bits=4, group_size=32)
    partly.model.layers[1].mlp.down_proj = torch.nn.Linear(64, 32)
    assert not policy.prefill_on_kernels(partly, 20, 1)
