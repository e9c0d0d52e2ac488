"""The training operators: loom::token_nll (the language-model loss straight from the logits' dtype) and
loom::flash_attention (whole-sequence attention with its backward). Each against torch (F.cross_entropy, SDPA) and a
float64 truth, in fp32 and bf16, over odd shapes, with opcheck, bad inputs, NaN rows and the torch path the
operators take where the library is off; and the model paths that use them (loss and attention of a training step
equal the reference's)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.kernels import build, ops, policy

ops_ = torch.ops.loom


def _logits(n, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, V, generator=g) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[1::5] = -100
    return x, labels


def _ulp_close(a: torch.Tensor, b: torch.Tensor, dtype) -> None:
    """Within one unit in the last place of bf16, or a few of fp32 (exp implementations differ by an ulp or two)."""
    if dtype is torch.bfloat16:
        torch.testing.assert_close(a.float(), b.float(), rtol=2.0 ** -7, atol=1e-9)
    else:
        torch.testing.assert_close(a, b, rtol=4e-6, atol=1e-8)


# -- token_nll ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,V", [(1, 7), (13, 1001), (40, 32000)])
def test_token_nll_is_cross_entropy(dtype, n, V):
    x, labels = _logits(n, V, dtype)
    loss = ops.token_nll(x, labels, -100)
    mean = loss.sum() / (labels != -100).sum()
    mean.backward()
    mine = x.grad.clone()
    x.grad = None
    ref = F.cross_entropy(x.float(), labels, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(mean, ref, rtol=2e-6, atol=1e-6)
    _ulp_close(mine, x.grad, dtype)
    assert mine.dtype is dtype and bool((loss[labels == -100] == 0).all())


def test_token_nll_sum_and_scaled_gradient_as_the_reference_sum():
    x, labels = _logits(9, 50, torch.float32, seed=3)
    (ops.token_nll(x, labels, -100).sum() / 7.0).backward()
    mine = x.grad.clone()
    x.grad = None
    (F.cross_entropy(x, labels, ignore_index=-100, reduction="sum") / 7.0).backward()
    _ulp_close(mine, x.grad, torch.float32)


def test_token_nll_row_stride_and_custom_ignore_index():
    x, labels = _logits(6, 33, torch.float32, seed=5)
    wide = torch.randn(6, 40)
    wide[:, :33] = x.detach()
    labels[2] = 7
    labels[labels == -100] = 7
    got = ops.token_nll(wide[:, :33], labels, 7)
    want = F.cross_entropy(x.detach(), labels, ignore_index=7, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_token_nll_nan_row_and_all_ignored():
    x, labels = _logits(4, 20, torch.float32)
    x = x.detach().clone()
    labels = torch.tensor([3, 4, -100, 5])
    x[1, 9] = float("nan")
    x.requires_grad_(True)
    loss = ops.token_nll(x, labels, -100)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 3]]).all() and loss[2] == 0
    loss.sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2, 3]]).all() and (x.grad[2] == 0).all()
    none = torch.full((4,), -100)
    total = ops.token_nll(x.detach(), none, -100).sum() / (none != -100).sum()
    assert torch.isnan(total) and torch.isnan(F.cross_entropy(x.detach(), none))


@pytest.mark.parametrize("bad", [20, -3])
def test_token_nll_label_out_of_range_is_an_error_naming_it(bad):
    x, _ = _logits(3, 20, torch.float32)
    with pytest.raises(IndexError, match=f"label {bad} at row 1 is out of range for 20 classes"):
        ops.token_nll(x, torch.tensor([0, bad, 2]), -100)


def test_token_nll_bad_inputs_name_the_operator():
    with pytest.raises(ValueError, match="loom::token_nll: logits has dtype float16"):
        ops_.token_nll(torch.randn(2, 5).half(), torch.tensor([0, 1]), -100)
    with pytest.raises(ValueError, match=r"loom::token_nll: expects logits \(N, V\) and labels \(N,\)"):
        ops_.token_nll(torch.randn(2, 5), torch.tensor([0, 1, 2]), -100)
    with pytest.raises(ValueError, match="labels must be integer"):
        ops_.token_nll(torch.randn(2, 5), torch.tensor([0.0, 1.0]), -100)


def test_token_nll_torch_path_where_the_library_is_off(monkeypatch):
    x, labels = _logits(11, 77, torch.bfloat16, seed=2)
    loss = ops.token_nll(x, labels, -100)
    loss.sum().backward()
    kernel = x.grad.clone()
    x.grad = None
    monkeypatch.setattr(build, "library", lambda: None)
    off = ops.token_nll(x, labels, -100)
    off.sum().backward()
    torch.testing.assert_close(off, loss, rtol=2e-6, atol=2e-6)
    _ulp_close(x.grad, kernel, torch.bfloat16)
    with pytest.raises(IndexError, match="label 77 at row 0"):
        ops.token_nll(x, torch.full((11,), 77), -100)


# -- flash_attention ------------------------------------------------------------------------------------------------
def _qkv(B, H, Hkv, T, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)
                 for shape in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))


def _grads(fn, q, k, v, g):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


SHAPES = [(1, 1, 1, 1, 1, 8, True), (2, 4, 2, 70, 70, 32, True), (1, 3, 1, 130, 130, 64, False),
          (2, 6, 3, 5, 37, 80, False), (1, 2, 2, 65, 65, 128, True), (1, 2, 1, 40, 20, 16, True),
          (1, 2, 1, 9, 9, 9, True)]  # an odd head dim: bf16 takes the fp32 products (no bf16 pairs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,T,S,D,causal", SHAPES)
def test_flash_attention_is_as_close_to_the_truth_as_sdpa(dtype, B, H, Hkv, T, S, D, causal):
    """Output and gradients against float64 SDPA: within SDPA's own error (bf16: its rounding points are SDPA's)."""
    q, k, v = _qkv(B, H, Hkv, T, S, D, dtype, seed=T + D)
    g = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    gqa = H != Hkv
    mine, mine_g = _grads(lambda a, b, c: ops.flash_attention(a, b, c, D ** -0.5, causal), q, k, v, g)
    sdpa, sdpa_g = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal,
                                                                          enable_gqa=gqa), q, k, v, g)
    truth, truth_g = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal,
                                                                           enable_gqa=gqa),
                            *(t.detach().double().requires_grad_(True) for t in (q, k, v)), g.double())
    floor = 1e-6 if dtype is torch.float32 else 1e-2

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    assert mine.dtype is dtype and mine.shape == (B, H, T, D)
    assert err(mine, truth) <= 1.5 * err(sdpa, truth) + floor
    for m, s, t in zip(mine_g, sdpa_g, truth_g):
        assert m.dtype is dtype and m.shape == t.shape
        assert err(m, t) <= 1.5 * err(s, t) + floor * 2


def test_flash_attention_output_is_a_transposed_contiguous_buffer_and_strided_grads_work():
    q, k, v = _qkv(2, 4, 2, 9, 9, 16, torch.float32)
    out = ops.flash_attention(q, k, v, 0.25, True)
    assert out.transpose(1, 2).is_contiguous()
    g = torch.randn(2, 9, 4, 16).transpose(1, 2)  # the layout the model's reshape hands back
    out.backward(g)
    want = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ops.flash_attention(q, k, v, 0.25, True).backward(g.contiguous())
    for w, t in zip(want, (q, k, v)):
        torch.testing.assert_close(t.grad, w, rtol=0, atol=0)


def test_training_ops_give_the_same_bits_on_one_and_two_threads():
    """Each (batch, kv head) and each row is computed whole by one thread: the split must not change a value."""
    q, k, v = _qkv(2, 4, 2, 100, 100, 32, torch.bfloat16, seed=9)
    g = torch.randn(2, 4, 100, 32).bfloat16()
    x, labels = _logits(50, 3000, torch.bfloat16, seed=4)
    cos, sin = torch.randn(1, 1, 100, 32), torch.randn(1, 1, 100, 32)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, grads = _grads(lambda a, b, c: ops.flash_attention(a, b, c, 0.2, True), q, k, v, g)
            x.grad = None
            loss = ops.token_nll(x, labels, -100)
            loss.sum().backward()
            results.append([out, *grads, loss, x.grad.clone(), ops.rope(q.detach(), cos, sin)])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_nan_propagates_as_sdpa(dtype):
    q, k, v = (t.detach().clone() for t in _qkv(1, 2, 2, 6, 6, 8, dtype))
    k[0, 0, 2, 3] = float("nan")
    out = ops.flash_attention(q, k, v, 0.3, True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype is torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(out[~torch.isnan(out)], want[~torch.isnan(want)], **tol)
    for t in (q, k, v):
        t.requires_grad_(True)
    _, mine = _grads(lambda a, b, c: ops.flash_attention(a, b, c, 0.3, True), q, k, v, torch.ones_like(out))
    _, sdpa = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=0.3), q, k, v,
                     torch.ones_like(out))
    for a, b in zip(mine, sdpa):  # where the gradients are NaN (0 times a NaN key included)
        assert torch.equal(torch.isnan(a), torch.isnan(b))


def test_flash_attention_torch_path_where_the_library_is_off(monkeypatch):
    q, k, v = _qkv(1, 4, 2, 33, 33, 16, torch.float32)
    g = torch.randn(1, 4, 33, 16)
    on, on_g = _grads(lambda a, b, c: ops.flash_attention(a, b, c, 0.25, True), q, k, v, g)
    monkeypatch.setattr(build, "library", lambda: None)
    off, off_g = _grads(lambda a, b, c: ops.flash_attention(a, b, c, 0.25, True), q, k, v, g)
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-6)
    for a, b in zip(off_g, on_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_flash_attention_bad_inputs_name_the_operator():
    with pytest.raises(ValueError, match="loom::flash_attention: 6 query heads are not a multiple of 4 kv heads"):
        ops_.flash_attention(torch.randn(1, 6, 3, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8), 1.0, True)
    with pytest.raises(ValueError, match="loom::flash_attention: q, k and v must share a dtype"):
        ops_.flash_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8).bfloat16(), torch.randn(1, 2, 3, 8),
                             1.0, True)
    with pytest.raises(ValueError, match="head dim 300 must be in 1..256"):
        ops_.flash_attention(torch.randn(1, 2, 3, 300), torch.randn(1, 2, 3, 300), torch.randn(1, 2, 3, 300), 1.0,
                             False)


@pytest.mark.parametrize("name,args", [
    ("token_nll", (_logits(5, 9, torch.float32)[0], torch.tensor([1, -100, 3, 8, 0]), -100)),
    ("token_nll", (_logits(3, 9, torch.bfloat16)[0].detach(), torch.tensor([1, 2, 3]), -100)),
    ("flash_attention", (*_qkv(1, 4, 2, 7, 7, 16, torch.float32), 0.25, True)),
    ("flash_attention", (*(t.detach() for t in _qkv(2, 2, 1, 3, 5, 8, torch.bfloat16)), 0.3, False)),
], ids=["token_nll-grad", "token_nll-bf16", "flash_attention-grad", "flash_attention-bf16"])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops_, name).default, args)


# -- rope -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_dtype,cs_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                              (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("D,cos_batch", [(64, 1), (10, 2), (128, 2)])
def test_rope_is_bitwise_apply_rotary_forward_and_backward(x_dtype, cs_dtype, D, cos_batch):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, 5, 3, D, generator=g).to(x_dtype).transpose(1, 2).requires_grad_(True)  # strided heads
    cos, sin = (torch.randn(cos_batch, 1, 5, D, generator=g).to(cs_dtype) for _ in range(2))
    y = ops.rope(x, cos, sin)
    grad = torch.randn(y.shape, generator=g).to(y.dtype)
    y.backward(grad)
    mine = x.grad.clone()
    x.grad = None
    want = ops.rope_reference(x, cos, sin)
    want.backward(grad)
    assert y.dtype is want.dtype and torch.equal(y, want) and torch.equal(mine, x.grad)


def test_rope_bad_inputs_and_opcheck():
    with pytest.raises(ValueError, match=r"loom::rope: cos and sin must be \(B=2 or 1, 1, T=3, D=8\)"):
        ops_.rope(torch.randn(2, 4, 3, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="loom::rope: expects x"):
        ops_.rope(torch.randn(2, 4, 3, 7), torch.randn(1, 1, 3, 7), torch.randn(1, 1, 3, 7))
    torch.library.opcheck(ops_.rope.default, (torch.randn(2, 4, 3, 8, requires_grad=True), torch.randn(1, 1, 3, 8),
                                              torch.randn(1, 1, 3, 8)))
    torch.library.opcheck(ops_.rope.default, (torch.randn(1, 2, 3, 8).bfloat16(), torch.randn(1, 1, 3, 8),
                                              torch.randn(1, 1, 3, 8)))


# -- where the models use them ----------------------------------------------------------------------------------------
def test_policy_takes_whole_sequences_without_a_mask():
    q, k, v = _qkv(1, 2, 2, 4, 4, 8, torch.float32)
    assert policy.flash_applies(q, k, v, None, True, 0.0) == build.available()
    with torch.no_grad():  # a prefill too
        assert policy.flash_applies(q, k, v, None, True, 0.0) == build.available()
        assert not policy.flash_applies(q[:, :, :1], k, v, None, True, 0.0)  # one query: the decode kernels' case
    assert policy.flash_applies(*(t.detach() for t in (q, k, v)), None, True, 0.0) == build.available()
    assert policy.flash_applies(q[:, :, :1], k, v, None, False, 0.0) == build.available()  # trained: any length
    assert not policy.flash_applies(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool), False, 0.0)
    assert not policy.flash_applies(q, k, v, None, True, 0.1)
    assert not policy.flash_applies(q.half(), k.half(), v.half(), None, True, 0.0)


@pytest.mark.parametrize("autocast", [False, True])
def test_llama_training_step_equals_the_reference(tmp_path, monkeypatch, autocast):
    """Loss and every gradient of a training step through loom::rope, loom::flash_attention and loom::token_nll,
    against the
    reference's model on the same checkpoint (fp32; bf16 autocast within bf16 rounding)."""
    transformers = pytest.importorskip("transformers")
    import loom

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :5] = -100
    calls = []
    for name in ("flash_attention", "token_nll", "rope"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, (lambda real, name: lambda *a: calls.append(name) or real(*a))(real, name))
    results = []
    for lib in (loom, transformers):
        model = lib.AutoModelForCausalLM.from_pretrained(tmp_path).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    if build.available():  # with the kernels off the model takes torch's ops, which must agree too
        assert calls.count("flash_attention") == 2 and calls.count("token_nll") == 1 and calls.count("rope") == 4
    else:
        assert not calls
    (loss, grads), (ref_loss, ref_grads) = results
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3 if autocast else 1e-6, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_prefill_takes_the_kernel_and_equals_the_reference(tmp_path, monkeypatch, dtype):
    """A generate's prefill (no autograd, 2+ queries, no mask) runs loom::flash_attention once per layer; its
    first-token scores match the reference's model on the same checkpoint (bf16 within bf16 rounding) and the
    greedy tokens are the reference's."""
    transformers = pytest.importorskip("transformers")
    import loom

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ids = torch.randint(1, 300, (1, 37), generator=torch.Generator().manual_seed(5))  # no pad id (0): no mask
    calls = []
    real = ops.flash_attention
    monkeypatch.setattr(ops, "flash_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    outs = []
    for lib in (loom, transformers):
        model = lib.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        outs.append(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, pad_token_id=0))
    if build.available():
        assert calls == [(1, 4, 37, 16)] * 2, calls
    else:
        assert not calls
    (out, ref) = outs
    tol = dict(rtol=2e-2, atol=2e-2) if dtype is torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.scores[0], ref.scores[0], **tol)
    if dtype is torch.float32:
        assert out.sequences.tolist() == ref.sequences.tolist()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("backward_inside", [True, False])
def test_compiled_training_step_has_the_eager_gradients(tmp_path, backward_inside, backend):
    """torch.compile of a training step. With `.backward()` inside the compiled function Dynamo breaks its graph
    there and would trace the operators' backwards (called by the autograd engine) as new frames: they must still
    write the gradients they return (gradients of 1e30 before the backwards were kept out of Dynamo)."""
    transformers = pytest.importorskip("transformers")
    import loom

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = loom.AutoModelForCausalLM.from_pretrained(tmp_path).train()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        if backward_inside:
            loss.backward()
        return loss

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        if not backward_inside:
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager = run(step)
    torch._dynamo.reset()
    compiled_loss, compiled = run(torch.compile(step, backend=backend))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# -- padded batches (encoders): key counts instead of a mask ---------------------------------------------------------
def _padded(B, H, Hkv, T, D, dtype, lens, seed=0, heads_last=True):
    """q (B, H, T, D), k and v (B, Hkv, T, D), as views of (B, T, heads, D) projections when heads_last (how the
    models hand them over), with the padding mask of `lens`"""
    g = torch.Generator().manual_seed(seed)
    if heads_last:
        q, k, v = (torch.randn(B, T, h, D, generator=g).to(dtype).transpose(1, 2) for h in (H, Hkv, Hkv))
    else:
        q, k, v = (torch.randn(B, h, T, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))
    lens = torch.tensor(lens, dtype=torch.int64)
    mask = (torch.arange(T) < lens[:, None])[:, None, None, :].expand(B, 1, T, T)
    return q, k, v, lens, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,T,D,lens,heads_last", [
    (3, 4, 4, 37, 32, [37, 20, 1], True), (2, 6, 2, 70, 64, [5, 70], True), (4, 2, 1, 9, 9, [9, 3, 8, 2], False),
    (2, 12, 12, 130, 32, [130, 65], True), (1, 2, 2, 16, 24, [16], False)])
def test_flash_attention_with_key_counts_equals_sdpa_with_the_padding_mask(dtype, B, H, Hkv, T, D, lens, heads_last):
    """Every query row, padding rows included, against SDPA with the padding mask: fp32 within SDPA's own error
    against float64, bf16 within one bf16 step; the strided heads of a (B, T, H, D) projection are read in place."""
    q, k, v, lens_t, mask = _padded(B, H, Hkv, T, D, dtype, lens, seed=T + D, heads_last=heads_last)
    gqa = H != Hkv
    with torch.no_grad():
        mine = ops.flash_attention(q, k, v, D ** -0.5, False, lens_t)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=gqa)
    assert mine.dtype is dtype and mine.shape == (B, H, T, D)
    if dtype is torch.float32:
        assert (mine.double() - truth).abs().max() <= 1.5 * (sdpa.double() - truth).abs().max() + 1e-6
    else:
        torch.testing.assert_close(mine.float(), sdpa.float(), rtol=2 ** -7, atol=2 ** -7)


def test_flash_attention_with_key_counts_zero_keys_gradients_and_the_torch_path(monkeypatch):
    """A batch row without keys gets zeros (SDPA's output for a fully masked row); gradients through key counts are
    SDPA's with the mask (the kernel's backward takes none); the library off gives the same through torch."""
    q, k, v, lens, mask = _padded(3, 2, 2, 11, 16, torch.float32, [11, 0, 4], seed=3)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    g = torch.randn(3, 2, 11, 16, generator=torch.Generator().manual_seed(5))
    mine, mine_g = _grads(lambda a, b, c: ops.flash_attention(a, b, c, 0.25, False, lens), q, k, v, g)
    sdpa, sdpa_g = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, scale=0.25),
                          q, k, v, g)
    assert torch.equal(mine[1], torch.zeros_like(mine[1]))
    torch.testing.assert_close(mine, torch.nan_to_num(sdpa), rtol=1e-5, atol=1e-6)
    for a, b in zip(mine_g, sdpa_g):
        torch.testing.assert_close(a, torch.nan_to_num(b), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(build, "library", lambda: None)
    with torch.no_grad():
        off = ops.flash_attention(q, k, v, 0.25, False, lens)
    torch.testing.assert_close(off, mine, rtol=1e-5, atol=1e-6)


def test_flash_attention_bad_key_counts_are_named():
    q = torch.randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match=r"loom::flash_attention: lens must be a CPU int64 tensor of the 2 batch"):
        ops_.flash_attention(q, q, q, 1.0, False, torch.tensor([3, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lens must be a CPU int64 tensor of the 2 batch rows' key counts, got "
                                         r"torch.int64 \(3,\)"):
        ops_.flash_attention(q, q, q, 1.0, False, torch.tensor([3, 1, 2]))
    torch.library.opcheck(ops_.flash_attention.default, (q, q, q, 0.5, False, torch.tensor([3, 1])))


def test_padded_encoder_batches_take_key_counts_only_for_right_padding_without_autograd():
    from loom.models.common import key_lengths
    q, k, v, lens, mask = _padded(2, 2, 2, 5, 8, torch.float32, [5, 3])
    with torch.no_grad():
        assert policy.padded_flash_applies(q, k, v, mask, False, 0.0) == build.available()
        assert not policy.padded_flash_applies(q, k, v, mask, True, 0.0)
        assert not policy.padded_flash_applies(q, k, v, mask, False, 0.1)
        assert not policy.padded_flash_applies(q, k, v, mask.float(), False, 0.0)  # an additive bias (MPNet)
    assert not policy.padded_flash_applies(q.requires_grad_(True), k, v, mask, False, 0.0)  # training: SDPA
    assert torch.equal(key_lengths(mask, 2), lens)
    assert torch.equal(key_lengths(mask[:1], 2), torch.tensor([5, 5]))
    first = mask[:1]
    assert torch.equal(key_lengths(first, 2), torch.tensor([5, 5]))
    assert torch.equal(key_lengths(first, 3), torch.tensor([5, 5, 5]))  # the same mask read for another batch
    left = mask.flip(-1)  # left padding: not a prefix of keys
    assert key_lengths(left, 2) is None
    assert key_lengths(mask.float(), 2) is None and key_lengths(mask[:, :, 0], 2) is None  # not a bool 4-D mask
    assert key_lengths(mask, 3) is None  # another batch
    window = mask.clone()
    window[0, 0, 0, 4] = False  # query rows that see different keys (a local attention window)
    assert key_lengths(window, 2) is None


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra"])
def test_padded_encoder_batch_takes_key_counts_and_equals_the_reference(tmp_path, monkeypatch, family):
    """An encoder's padded batch runs loom::flash_attention with key counts once per layer; its hidden states,
    padding rows included, equal the reference's (fp32, 1e-5)."""
    transformers = pytest.importorskip("transformers")
    import loom

    cfg_cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
               "distilbert": transformers.DistilBertConfig, "electra": transformers.ElectraConfig}[family]
    kw = (dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64) if family == "distilbert" else
          dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    torch.manual_seed(0)
    transformers.AutoModel.from_config(cfg_cls(vocab_size=100, **kw)).save_pretrained(tmp_path)
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    am[2, 2:] = 0
    calls = []
    real = ops.flash_attention
    monkeypatch.setattr(ops, "flash_attention", lambda *a: calls.append(a[5] if len(a) > 5 else None) or real(*a))
    with torch.no_grad():
        mine = loom.AutoModel.from_pretrained(tmp_path)(input_ids=ids, attention_mask=am).last_hidden_state
        ref = transformers.AutoModel.from_pretrained(tmp_path)(input_ids=ids, attention_mask=am).last_hidden_state
    if build.available():
        assert len(calls) == 2 and all(torch.equal(c, torch.tensor([12, 7, 2])) for c in calls)
    else:
        assert not calls
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def _small_bert(tmp_path):
    """loom's BertModel from a reference checkpoint (hidden 128, intermediate 512: large enough for the blocked GEMM)
    and the reference module"""
    transformers = pytest.importorskip("transformers")
    import loom

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=512)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    return loom.AutoModel.from_pretrained(tmp_path), transformers


def test_encoder_layers_hand_torch_one_thread_only_where_the_kernels_carry_them(tmp_path, monkeypatch):
    """An encoder forward whose products and attention all run in loom's kernels (fp32 blocked GEMM, flash attention
    with key counts) runs torch's own ops on one thread meanwhile (the decode hand-off); left padding, autograd,
    recorded attentions or a hooked Linear keep torch's threads. The hidden states do not depend on it."""
    from loom.kernels import threads

    model, transformers = _small_bert(tmp_path)
    ids = torch.randint(5, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 30:] = 0
    seen = []
    real = ops.flash_attention
    monkeypatch.setattr(ops, "flash_attention", lambda *a: seen.append(
        (threads.handoffs_in_force(), torch.get_num_threads())) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            handed = model(input_ids=ids, attention_mask=am).last_hidden_state
        on = build.available() and policy.fp32_gemm()
        assert seen == ([(1, 1)] * 2 if on else [(0, 2)] * 2 if build.available() else [])
        for case in ("left", "grad", "attentions", "hook"):
            seen.clear()
            mask = am.flip(-1) if case == "left" else am
            handle = (model.encoder.layer[1].output.dense.register_forward_hook(lambda *a: None)
                      if case == "hook" else None)
            with torch.set_grad_enabled(case == "grad"):
                out = model(input_ids=ids, attention_mask=mask, output_attentions=case == "attentions")
            assert all(h == 0 and n == 2 for h, n in seen), case
            if handle is not None:
                handle.remove()
                torch.testing.assert_close(out.last_hidden_state, handed, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
    ref = transformers.BertModel.from_pretrained(tmp_path)(input_ids=ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(handed, ref, rtol=1e-5, atol=1e-5)


# -- an additive score bias (MPNet's relative positions) ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_shape,lens", [((1, 4, 21, 21), [21, 13, 2]), ((3, 1, 21, 21), None),
                                             ((3, 4, 21, 21), [5, 21, 21])])
def test_flash_attention_with_a_bias_equals_sdpa_with_the_float_mask(dtype, bias_shape, lens):
    """Scores * scale + bias, as SDPA adds a float mask (padding keys skipped with key counts, masked with -inf in
    SDPA's): fp32 within SDPA's own error against float64, bf16 within one bf16 step; broadcast bias dims read in
    place, a bias in fp32 or the inputs' dtype."""
    lens = [21, 21, 21] if lens is None else lens
    q, k, v, lens_t, mask = _padded(3, 4, 4, 21, 16, dtype, lens, seed=7)
    g = torch.Generator().manual_seed(8)
    for bias in (torch.randn(bias_shape, generator=g), torch.randn(bias_shape, generator=g).to(dtype)):
        attn = bias.to(dtype).masked_fill(~mask, float("-inf"))
        with torch.no_grad():
            mine = ops.flash_attention(q, k, v, 0.25, False, lens_t, bias)
            sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=0.25)
            truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=attn.double(),
                                                   scale=0.25)
        if dtype is torch.float32:
            assert (mine.double() - truth).abs().max() <= 1.5 * (sdpa.double() - truth).abs().max() + 1e-6
        else:
            torch.testing.assert_close(mine.float(), sdpa.float(), rtol=2 ** -7, atol=2 ** -7)


def test_flash_attention_bias_gradients_and_bad_biases():
    """A bias that wants a gradient gets SDPA's (with q, k, v's); a bias of the wrong shape or dtype is named."""
    q, k, v, lens, mask = _padded(2, 2, 2, 6, 8, torch.float32, [6, 4], seed=9)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    bias = torch.randn(1, 2, 6, 6, requires_grad=True)
    ops.flash_attention(q, k, v, 0.3, False, lens, bias).sum().backward()
    mine = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~mask, float("-inf")), scale=0.3).sum() \
        .backward()
    for a, t in zip(mine, (q, k, v, bias)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match=r"loom::flash_attention: bias must be a CPU float32 or torch.float32 "
                                         r"tensor of shape \(B=2 or 1, H=2 or 1, T=6, S=6\), got torch.float32 "
                                         r"\(2, 2, 6, 5\)"):
        ops_.flash_attention(x, x, x, 1.0, False, None, torch.randn(2, 2, 6, 5))
    with pytest.raises(ValueError, match="bias must be a CPU float32 or torch.bfloat16 tensor"):
        ops_.flash_attention(x.bfloat16(), x.bfloat16(), x.bfloat16(), 1.0, False, None,
                             torch.randn(1, 2, 6, 6).half())
    torch.library.opcheck(ops_.flash_attention.default, (x, x, x, 0.5, False, torch.tensor([6, 2]),
                                                         torch.randn(1, 2, 6, 6)))


def test_mpnet_padded_batch_takes_the_bias_and_key_counts_and_equals_the_reference(tmp_path, monkeypatch):
    """MPNet's layers run loom::flash_attention with the relative position bias and the key counts (torch on one
    thread meanwhile where the products run in loom's kernels too), equal to the reference on a padded batch; a row
    without keys (the reference averages it) and recorded attentions keep the masked bias through SDPA/eager."""
    transformers = pytest.importorskip("transformers")
    import loom
    from loom.kernels import threads

    cfg = transformers.MPNetConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=512)
    torch.manual_seed(0)
    transformers.MPNetModel(cfg).save_pretrained(tmp_path)
    ids = torch.randint(5, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 25:] = 0
    am[2, 3:] = 0
    seen = []
    real = ops.flash_attention
    monkeypatch.setattr(ops, "flash_attention", lambda *a: seen.append(
        (a[5].tolist() if a[5] is not None else None, a[6] is not None, threads.handoffs_in_force())) or real(*a))
    model = loom.AutoModel.from_pretrained(tmp_path)
    reference = transformers.MPNetModel.from_pretrained(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for mask, flash in ((am, True), (torch.ones_like(ids), True), (am * (torch.arange(3) != 1)[:, None], False)):
            seen.clear()
            with torch.no_grad():
                mine = model(input_ids=ids, attention_mask=mask).last_hidden_state
                ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
            if build.available() and flash:
                lens = mask.sum(-1).tolist() if not mask.all() else None
                handoff = int(policy.fp32_gemm())
                assert seen == [(lens, True, handoff)] * 2
            else:
                assert not [s for s in seen if s[1]]
        seen.clear()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=am, output_attentions=True)
        assert not [s for s in seen if s[1]] and len(out.attentions) == 2
    finally:
        torch.set_num_threads(before)


def test_padded_encoder_batches_from_two_threads_equal_their_sequential_results(tmp_path):
    """Two threads running an encoder on differently padded batches at once (the key-count memo and the thread
    hand-off are per call and per thread) give each batch its sequential result."""
    import threading

    model, _ = _small_bert(tmp_path)
    g = torch.Generator().manual_seed(3)
    batches = []
    for i in range(2):
        ids = torch.randint(5, 100, (4, 48), generator=g)
        am = (torch.arange(48) < torch.tensor([48, 30, 12, 40])[torch.arange(4).roll(i)][:, None]).long()
        batches.append((ids, am))
    with torch.no_grad():
        want = [model(input_ids=ids, attention_mask=am).last_hidden_state for ids, am in batches]
    got, errors = [[None] * 6, [None] * 6], []

    def run(i):
        try:
            with torch.no_grad():
                for r in range(6):
                    got[i][r] = model(input_ids=batches[i][0], attention_mask=batches[i][1]).last_hidden_state
        except Exception as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors and not any(w.is_alive() for w in workers)
    for i in range(2):
        for r in range(6):
            torch.testing.assert_close(got[i][r], want[i], rtol=1e-6, atol=1e-6)
