"""loom::dense_linear on every code path of csrc/dense.c: 1-16 activation rows (and beyond), weight counts that leave
a partial tile, K off the 16/32-column blocks and tiny K, with and without bias, every fp32/bf16 mix of activation,
weight and bias, NaN/inf, strided inputs, several threads, and each instruction-set level the CPU has built in its
own process (AVX2, AVX-512, AVX-512 BF16's vdpbf16ps) giving the same results within rounding."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from loomtest import kernels_on, runs_at_levels

from loom.kernels import build, ops, policy

ops_ = torch.ops.loom
F32, BF16 = torch.float32, torch.bfloat16


def _args(m, k, n, xt=F32, wt=F32, bt=F32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed * 1009 + m * 97 + k * 13 + n)
    x = torch.randn(m, k, generator=g).to(xt)
    w = torch.randn(n, k, generator=g).to(wt)
    b = torch.randn(n, generator=g).to(bt) if bias else None
    return x, w, b


def _check_exact_within_rounding(got, x, w, b):
    """Against the product in float64 of the same (rounded) inputs: fp32 sums stay within 1e-5 of the size of the
    terms, and a bf16 output is additionally one rounding (half a bf16 ulp) from the exact value. With the kernels
    off, F.linear rounds the weight and bias to x's dtype and a bf16 matmul may round partial sums: bf16 tolerance."""
    if not kernels_on():
        w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    terms = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    bound = 1e-5 * terms + 1e-30
    if got.dtype is BF16:
        bound = bound + (exact.abs() * 2.0 ** -8 if kernels_on() else terms * 2.0 ** -7)
    err = (got.double() - exact).abs()
    assert got.dtype == x.dtype and got.shape == exact.shape
    assert (err <= bound).all(), f"max error {(err - bound).max().item():.3g} over the bound"


ROWS = list(range(1, 17)) + [19]
SHAPES = [(1, 5), (5, 3), (31, 7), (33, 6), (47, 13), (64, 4), (770, 9)]  # (K, N): off the blocks, partial tiles


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rows_and_odd_shapes_match_float64(rows, k, n, dtype):
    x, w, b = _args(rows, k, n, dtype, dtype, dtype, bias=rows % 2 == 0)
    _check_exact_within_rounding(ops_.dense_linear(x, w, b), x, w, b)


MIXES = [(xt, wt, bt) for xt in (F32, BF16) for wt in (F32, BF16) for bt in (F32, BF16, None)]


@pytest.mark.parametrize("xt,wt,bt", MIXES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_dtype_mixes_match_float64(xt, wt, bt, rows):
    x, w, b = _args(rows, 83, 11, xt, wt, bt or F32, bias=bt is not None)
    _check_exact_within_rounding(ops_.dense_linear(x, w, b), x, w, b)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16])
def test_bf16_within_the_tolerance_of_torchs_bf16_matmul(rows):
    x, w, b = _args(rows, 768, 37, BF16, BF16, BF16)
    torch.testing.assert_close(ops_.dense_linear(x, w, b), F.linear(x, w, b), rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("column", [0, 5, 15, 16, 17, 31, 32, 40, 44])  # in blocks of 16 and 32, and the tail
@pytest.mark.parametrize("rows", [1, 4, 7])
def test_nan_and_inf_propagate_as_in_torch(dtype, column, rows):
    x, w, b = _args(rows, 45, 6, dtype, dtype, dtype)
    x[rows - 1, column] = float("nan")  # the last row's outputs all NaN
    w[2, column] = float("inf")  # weight row 2 gives +-inf, or NaN where the activation is 0 or NaN
    x[0, column] = 0.0 if rows > 1 else x[0, column]
    got = ops_.dense_linear(x, w, b)
    want = F.linear(x.double(), w.double(), b.double())
    assert got.isnan().any() and (got.isinf().any() or rows == 1)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-2 if dtype is BF16 else 1e-5,
                               atol=5e-2 if dtype is BF16 else 1e-4)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_strided_inputs_give_the_contiguous_result(dtype):
    x, w, b = _args(5, 70, 9, dtype, dtype, dtype)
    xs = x.t().contiguous().t()  # (5, 70) with strides (1, 5)
    ws = w.t().contiguous().t()
    bs = torch.stack([b, b], 1)[:, 0]  # stride 2
    xe = torch.stack([x, x], -1)[..., 0]  # unit stride missing along K
    want = ops_.dense_linear(x, w, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is F32 else dict(rtol=1e-2, atol=5e-2)
    same = torch.equal if kernels_on() else lambda a, b: torch.allclose(a, b, **tol)  # BLAS picks paths by layout
    for args in ((xs, w, b), (x, ws, b), (x, w, bs), (xe, ws, bs)):
        assert same(ops_.dense_linear(*args), want)
    assert same(ops_.dense_linear(x.view(1, 5, 70).expand(2, 5, 70), w, b)[1], want)


@pytest.mark.parametrize("wt", [F32, BF16])
@pytest.mark.parametrize("xt", [F32, BF16])
def test_a_rows_result_does_not_depend_on_the_other_rows(xt, wt):
    """Each output sums its products in the same order whatever the row count (1 row runs weight row by weight row,
    more rows in tiles of 4 x 4): a sequence decodes to the same tokens alone and in a batch."""
    if not kernels_on():
        pytest.skip("F.linear's blocking depends on the row count")
    x, w, b = _args(16, 100, 23, xt, wt, wt)
    full = ops_.dense_linear(x, w, b)
    for m in range(1, 17):
        assert torch.equal(ops_.dense_linear(x[:m], w, b), full[:m]), m
        assert torch.equal(ops_.dense_linear(x[m - 1:m], w, b), full[m - 1:m]), m


@pytest.mark.parametrize("rows", [1, 6, 16])
def test_several_threads_give_the_one_thread_result(rows):
    if not kernels_on():
        pytest.skip("F.linear's blocking depends on the thread count")
    x, w, b = _args(rows, 200, 1037, F32, BF16, F32)
    one, two = _on_one_and_two_threads(x, w, b)
    assert torch.equal(one, two)


def _on_one_and_two_threads(x, w, b):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops_.dense_linear(x, w, b)
        torch.set_num_threads(2)
        return one, ops_.dense_linear(x, w, b)
    finally:
        torch.set_num_threads(before)


# -- every level this CPU supports, each in its own process, against each other -----------------------------------
_CHILD = textwrap.dedent("""
    import json, sys, torch
    from loom.kernels import build
    torch.set_num_threads(1)
    out = {"describe": build.describe(), "cases": []}
    for seed, (m, k, n, xt, wt) in enumerate(json.loads(sys.argv[1])):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k, generator=g).to(getattr(torch, xt))
        w = torch.randn(n, k, generator=g).to(getattr(torch, wt))
        b = torch.randn(n, generator=g).to(x.dtype)
        out["cases"].append(torch.ops.loom.dense_linear(x, w, b).double().flatten().tolist())
    print(json.dumps(out))
""")
LEVEL_CASES = [(m, k, n, xt, wt) for m in (1, 2, 3, 4, 5, 8, 16) for (k, n) in ((37, 5), (768, 10))
               for xt, wt in (("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"))]


def test_every_supported_level_gives_the_same_results():
    levels = build.supported_levels()
    if not levels:
        pytest.skip("no kernel level builds on this machine (needs Linux x86-64 with AVX2)")
    runs = runs_at_levels(_CHILD, json.dumps(LEVEL_CASES), levels=levels)
    base = runs["off"]["cases"]  # torch's F.linear
    for level in levels:
        for (m, k, n, xt, wt), got, want in zip(LEVEL_CASES, runs[level]["cases"], base):
            got, want = torch.tensor(got), torch.tensor(want)
            # fp32 sums in different orders; a bf16 output may round to the neighbouring value
            tol = dict(rtol=2 ** -7, atol=1e-4 * k) if xt == "bfloat16" else dict(rtol=1e-5, atol=2e-6 * k)
            torch.testing.assert_close(got, want, **tol, msg=lambda s: f"{level} {(m, k, n, xt, wt)}: {s}")


def test_batched_bf16_goes_to_the_kernel_where_it_beats_torch():
    from loom.kernels import policy

    x, w = torch.randn(8, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    with torch.no_grad():
        assert policy.dense_applies(x[:1], w, None) == kernels_on()
        assert policy.dense_applies(x.float(), w.float(), None) == kernels_on()
        fast = policy.EMULATED_BF16 or build.level() == "x86-64-v4-vnni"  # vdpbf16ps, measured in policy.py
        assert policy.dense_applies(x, w, None) == (kernels_on() and fast)


# -- the blocked fp32 GEMM (more rows than decode sizes, AVX-512 levels: csrc/dense.c sg_*) ------------------------
needs_blocked = pytest.mark.skipif(not (kernels_on() and policy.fp32_gemm()),
                                   reason="needs a kernel level with loom's blocked fp32 GEMM (AVX-512)")


@needs_blocked
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [17, 24, 33, 64, 71, 130])  # every tail of the 8-row micro-kernel
@pytest.mark.parametrize("k,n", [(64, 32), (100, 70), (127, 33), (300, 17), (770, 9), (1024, 96)])
def test_blocked_fp32_gemm_within_rounding(rows, k, n, bias):
    # called directly: every shape, including those the routing leaves to torch (fewer than 2^20 multiply-adds)
    x, w, b = _args(rows, k, n, bias=bias, seed=3)
    got = ops_.dense_linear(x, w, b)
    _check_exact_within_rounding(got, x, w, b)
    # its error bound: blocks of 64 inputs summed in order, the blocks' sums added in order (about 64 + K / 64
    # roundings of the size of the terms), tighter than a whole-row sequential sum
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    terms = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert ((got.double() - exact).abs() <= (64 + k // 64 + 2) * 2.0 ** -24 * terms).all()


@needs_blocked
def test_blocked_fp32_gemm_threads_rows_and_nan():
    x, w, b = _args(203, 256, 150, seed=5)
    x[7, 3], x[150, 0] = float("nan"), float("inf")
    one, two = _on_one_and_two_threads(x, w, b)
    assert torch.equal(one.isnan(), two.isnan()) and torch.equal(torch.nan_to_num(one), torch.nan_to_num(two))
    ref = F.linear(x, w, b)
    assert torch.equal(one.isnan(), ref.isnan()) and torch.equal(one.isinf(), ref.isinf())
    # a row's result does not depend on the other rows (the micro-kernel takes 8 at a time, the tail fewer)
    for r in (0, 7, 200):
        assert torch.equal(torch.nan_to_num(ops_.dense_linear(x[r:r + 1].repeat(33, 1), w, b)[0]),
                           torch.nan_to_num(one[r]))


@pytest.mark.parametrize("rows,n,k,grad,dtype,taken", [
    (512, 768, 768, False, F32, True), (32, 256, 128, False, F32, True), (31, 768, 768, False, F32, False),
    (512, 768, 768, True, F32, False), (512, 768, 768, False, BF16, False), (40, 16, 16, False, F32, False)])
def test_fp32_rows_beyond_decode_sizes_take_the_blocked_gemm_where_it_wins(rows, n, k, grad, dtype, taken):
    x, w, b = _args(rows, k, n, xt=dtype, wt=dtype, bt=dtype)
    with torch.set_grad_enabled(grad):
        assert policy.dense_applies(x, w, b) == (taken and kernels_on() and policy.fp32_gemm())


# -- GELU in the blocked GEMM's last pass (loom::dense_gelu, encoders' up projections) -------------------------------
def _gelu_truth(y: torch.Tensor) -> torch.Tensor:
    """x / 2 * (1 + erf(x / sqrt 2)) in float64, through erfc for negative x (1 + erf loses its digits there)"""
    y = y.double()
    return 0.5 * y * torch.where(y < 0, torch.special.erfc(-y / 2 ** 0.5), 1 + torch.erf(y / 2 ** 0.5))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows,k,n", [(17, 64, 32), (33, 100, 70), (130, 384, 200), (64, 1, 5)])
def test_dense_gelu_is_gelu_of_the_product_within_torchs_own_error(rows, k, n, bias):
    """Against float64 GELU of the float64 product: no further off than torch's F.gelu of its own product, and
    within 2e-6 of torch's GELU of loom's product (torch's own error reaches 1.2e-6)."""
    x, w, b = _args(rows, k, n, bias=bias, seed=11)
    with torch.no_grad():
        got = torch.ops.loom.dense_gelu(x, w, b)
        lin = ops_.dense_linear(x, w, b)
    truth = _gelu_truth(F.linear(x.double(), w.double(), None if b is None else b.double()))
    torch_err = (F.gelu(F.linear(x, w, b)).double() - truth).abs().max()
    assert got.shape == (rows, n) and got.dtype is F32
    assert (got.double() - truth).abs().max() <= torch_err + 2e-6 * truth.abs().max()
    if kernels_on() and policy.fp32_gemm():
        torch.testing.assert_close(got, F.gelu(lin), rtol=1e-6, atol=2e-6)
    else:  # no blocked GEMM at this level: torch's ops
        assert torch.equal(got, F.gelu(F.linear(x, w, b)))


def test_dense_gelu_values_specials_and_the_torch_paths(monkeypatch):
    """Every bias value through the activation (x = 0): float64-exact GELU within 5e-7 (torch's: 1.2e-6), the
    infinities and NaN give NaN; 16 rows or fewer, a wanted gradient, a level without the blocked GEMM and the
    library off take torch's ops."""
    v = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])])
    x, w = torch.zeros(20, 3), torch.zeros(v.numel(), 3)
    with torch.no_grad():
        got = ops.dense_gelu(x, w, v)[0]
    fin = v.isfinite()
    if kernels_on() and policy.fp32_gemm():
        assert (got[fin].double() - _gelu_truth(v[fin])).abs().max() <= 5e-7
        assert got[~fin].isnan().all()
    else:  # torch's GELU (its own error: 1.2e-6)
        assert torch.equal(got.nan_to_num(), F.gelu(F.linear(x, w, v))[0].nan_to_num())
    x, w, b = _args(16, 40, 24, seed=2)
    with torch.no_grad():
        assert torch.equal(ops.dense_gelu(x, w, b), F.gelu(F.linear(x, w, b)))  # decode sizes: torch's
    xg = _args(40, 40, 24, seed=2)[0].requires_grad_(True)
    out = ops.dense_gelu(xg, w, b)
    out.sum().backward()
    assert xg.grad is not None and torch.equal(out, F.gelu(F.linear(xg, w, b)))
    monkeypatch.setattr(build, "library", lambda: None)
    x = xg.detach()
    with torch.no_grad():
        assert torch.equal(ops.dense_gelu(x, w, b), F.gelu(F.linear(x, w, b)))


def test_dense_gelu_bad_inputs_are_named():
    with pytest.raises(ValueError, match="loom::dense_gelu: takes fp32 x, weight and bias, got torch.bfloat16"):
        torch.ops.loom.dense_gelu(torch.randn(20, 8).bfloat16(), torch.randn(4, 8).bfloat16(), None)
    with pytest.raises(ValueError, match="x has 8 features but weight"):
        torch.ops.loom.dense_gelu(torch.randn(20, 8), torch.randn(4, 9), None)
    torch.library.opcheck(torch.ops.loom.dense_gelu.default, (torch.randn(20, 8), torch.randn(4, 8), torch.randn(4)))


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_encoder_up_projection_takes_dense_gelu_and_equals_the_reference(tmp_path, monkeypatch, family):
    """An encoder's intermediate Linear + exact GELU on more than decode-size fp32 rows is one loom::dense_gelu call
    per layer (where the level has the blocked GEMM) and the hidden states equal the reference's; a hook on the
    Linear keeps the two modules' own calls."""
    transformers = pytest.importorskip("transformers")
    import loom

    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=512)
    else:
        cfg = transformers.DistilBertConfig(vocab_size=100, dim=128, n_layers=2, n_heads=4, hidden_dim=512)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path)
    ids = torch.randint(5, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    real = ops.dense_gelu
    monkeypatch.setattr(ops, "dense_gelu", lambda *a: calls.append(1) or real(*a))
    model = loom.AutoModel.from_pretrained(tmp_path)
    with torch.no_grad():
        mine = model(input_ids=ids).last_hidden_state
        ref = transformers.AutoModel.from_pretrained(tmp_path)(input_ids=ids).last_hidden_state
    assert len(calls) == (2 if kernels_on() and policy.fp32_gemm() else 0)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    up = model.encoder.layer[0].intermediate.dense if family == "bert" else model.transformer.layer[0].ffn.lin1
    seen = []
    up.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    calls.clear()
    with torch.no_grad():
        hooked = model(input_ids=ids).last_hidden_state
    assert seen == [(2, 24, 512)] and len(calls) == (1 if kernels_on() and policy.fp32_gemm() else 0)
    torch.testing.assert_close(hooked, mine, rtol=1e-6, atol=1e-6)
