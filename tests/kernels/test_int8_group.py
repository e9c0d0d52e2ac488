"""loom::int8_group_linear (group-wise int8 weights, GGUF's Q8_0): the C kernel gives bit for bit the arithmetic
csrc/int8g.c states, which its torch path (`int8_group_reference`, used with the kernels off) computes too; so every
level, every row count and the kernels off agree to the bit. Also: within the int16 rounding bound of the
dequantized float matmul, a row's result independent of the rest of the batch, inf/NaN rows as a float matmul, odd
N and K tails, float16/float32 scales, bf16 inputs, several threads, gradients, fake tensors and bad input."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from loomtest import kernels_on, runs_at_levels

from loom.kernels import build, ops

native = pytest.mark.skipif(not kernels_on(), reason="needs loom's C kernels (Linux x86-64 with AVX2 and gcc)")
op = torch.ops.loom.int8_group_linear

# rows: every decode pass size, chunks of 64 rows and a tail; (K, N, G): K with a partial 8-group tail (200 groups
# of 32 = 25 * 8; 13 groups: 8 + 5), one group, big groups; N: partial weight tiles
ROWS = [1, 2, 3, 4, 5, 7, 8, 16, 17, 64, 65, 130]
SHAPES = [(416, 37, 32), (32, 5, 32), (96, 70, 16), (1024, 9, 512), (768, 4, 64), (6400, 3, 32)]


def _args(rows, k, n, g, seed=0, half=True):
    gen = torch.Generator().manual_seed(seed * 7919 + rows * 31 + k + n + g)
    x = torch.randn(rows, k, generator=gen) * 3
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    s = torch.rand(n, k // g, generator=gen) / 50
    return x, w, s.half() if half else s


def _within_int16_bound(got, x, w, s):
    exact = F.linear(x.double(), ops.int8_group_dequantize(w, s).double())
    # each x rounds by at most max|x| / 65534 (half an int16 step), moving each output by that times sum |w|, plus
    # float32 roundings of the group products and their sum
    wsum = ops.int8_group_dequantize(w, s).double().abs().sum(1)
    bound = x.abs().amax(1, keepdim=True).double() / 65534 * wsum + 1e-5 * exact.abs().amax().clamp(min=1)
    assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() - bound).max()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n,g", SHAPES)
def test_same_bits_as_the_stated_arithmetic_and_within_the_int16_bound(rows, k, n, g):
    x, w, s = _args(rows, k, n, g)
    got = op(x, w, s, g)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert torch.equal(got, ops.int8_group_reference(x, w, s, g))
    _within_int16_bound(got, x, w, s)


def test_reference_is_the_stated_arithmetic_written_out():
    """The torch path itself against the header's recipe, written out with int64 lane sums and Python loops."""
    x, w, s = _args(3, 13 * 32, 5, 32)
    amax = x.abs().amax(1, keepdim=True)
    q = torch.round(x * (torch.tensor(32767.0) / amax)).long()
    t = torch.zeros(8, 3, 5)
    for b in range(13):
        for lane in range(8):
            cols = [b * 32 + 16 * step + 2 * lane + e for step in range(2) for e in range(2)]
            exact = (q[:, cols][:, None, :] * w.long()[:, cols][None]).sum(-1)  # (M, N) int64
            t[lane] += exact.float() * s[:, b].float()
    total = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))
    assert torch.equal(ops.int8_group_reference(x, w, s, 32), total * (amax / 32767.0))


@pytest.mark.parametrize("half", [True, False])
def test_float16_and_float32_scales_give_the_same_bits_for_the_same_values(half):
    x, w, s = _args(3, 256, 11, 32, half=True)
    assert torch.equal(op(x, w, s.float(), 32), op(x, w, s, 32))


def test_a_rows_result_does_not_depend_on_the_other_rows():
    x, w, s = _args(130, 416, 37, 32)
    alone = torch.cat([op(x[i:i + 1], w, s, 32) for i in (0, 5, 64, 129)])
    assert torch.equal(op(x, w, s, 32)[[0, 5, 64, 129]], alone)
    assert torch.equal(op(x[:16], w, s, 32)[5], alone[1])


@native
def test_several_threads_give_the_one_thread_result():
    from loom.kernels.threads import pool_threads

    x, w, s = _args(9, 416, 301, 32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, w, s, 32)
        torch.set_num_threads(max(2, old))
        assert pool_threads() >= 1
        assert torch.equal(op(x, w, s, 32), one)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_inf_and_nan_rows_propagate_as_in_a_float_matmul(rows):
    x, w, s = _args(rows, 96, 6, 32)
    w[2, 7] = 0  # inf * 0 = NaN in row 2's output
    x[0, 7] = float("inf")
    if rows > 1:
        x[1, 40] = float("nan")
    got = op(x, w, s, 32)
    want = F.linear(x.double(), ops.int8_group_dequantize(w, s).double()).float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert torch.equal(got[finite.all(1)], op(x[finite.all(1)], w, s, 32))  # finite rows untouched by the others
    torch.testing.assert_close(got, ops.int8_group_reference(x, w, s, 32), rtol=0, atol=0, equal_nan=True)


def test_zero_rows_and_empty_shapes():
    x, w, s = _args(4, 64, 3, 32)
    x[1] = 0
    assert torch.equal(op(x, w, s, 32)[1], torch.zeros(3))
    assert op(x[:0], w, s, 32).shape == (0, 3)
    assert op(x, w[:0], s[:0], 32).shape == (4, 0)


def test_batched_and_bf16_inputs():
    x, w, s = _args(6, 64, 5, 32)
    assert torch.equal(op(x.view(2, 3, 64), w, s, 32).view(6, 5), op(x, w, s, 32))
    xb = x.bfloat16()
    got = op(xb, w, s, 32)
    assert got.dtype == torch.bfloat16 and torch.equal(got, op(xb.float(), w, s, 32).bfloat16())


def test_gradient_to_the_input_and_none_to_the_scale():
    x, w, s = _args(3, 64, 5, 32, half=False)
    x.requires_grad_(True)
    op(x, w, s, 32).sum().backward()
    torch.testing.assert_close(x.grad, ops.int8_group_dequantize(w, s).sum(0).expand(3, -1))
    s.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="no gradient for scale"):
        op(x, w, s, 32).sum().backward()


def test_fake_tensors_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, s = _args(2, 64, 5, 32)
    with FakeTensorMode() as mode:
        out = op(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(s), 32)
    assert out.shape == (2, 5)
    compiled = torch.compile(lambda a: op(a, w, s, 32), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), op(x, w, s, 32))


@pytest.mark.parametrize("args,match", [
    (lambda x, w, s: (x, w, s, 24), r"group_size=24 must be a multiple of 16"),
    (lambda x, w, s: (x, w, s, 1024), r"group_size=1024 must be a multiple of 16 between 16 and 512"),
    (lambda x, w, s: (x[:, :48], w[:, :48], s[:, :1], 32), r"group_size=32 must divide K=48"),
    (lambda x, w, s: (x, w.float(), s, 32), r"weight must be int8 \(N, K\)"),
    (lambda x, w, s: (x, w, s.double(), 32), r"scale must be float16 or float32 \(5, 2\)"),
    (lambda x, w, s: (x, w, s[:, :1], 32), r"scale must be float16 or float32 \(5, 2\)"),
    (lambda x, w, s: (x[:, :32], w, s, 32), r"x has 32 features but weight \(5, 64\) expects 64"),
    (lambda x, w, s: (x.long(), w, s, 32), r"x must be floating point"),
])
def test_bad_input_is_named(args, match):
    x, w, s = _args(2, 64, 5, 32)
    with pytest.raises(ValueError, match=r"loom::int8_group_linear: " + match):
        op(*args(x, w, s))


# -- every level this CPU supports and the kernels off, each in its own process: the same bits -----------------------
_CHILD = textwrap.dedent("""
    import hashlib, json, sys, torch
    from loom.kernels import build
    torch.set_num_threads(1)
    out = {"describe": build.describe(), "cases": []}
    for seed, (m, k, n, g) in enumerate(json.loads(sys.argv[1])):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k, generator=gen)
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        s = (torch.rand(n, k // g, generator=gen) / 50).half()
        y = torch.ops.loom.int8_group_linear(x, w, s, g)
        out["cases"].append(hashlib.sha256(y.numpy().tobytes()).hexdigest())
    print(json.dumps(out))
""")
LEVEL_CASES = [(m, k, n, g) for m in (1, 2, 3, 4, 5, 8, 16, 17, 70) for (k, n, g) in ((416, 37, 32), (768, 6, 64))]


def test_every_supported_level_and_the_kernels_off_give_the_same_bits():
    levels = build.supported_levels()
    runs = runs_at_levels(_CHILD, json.dumps(LEVEL_CASES), levels=levels)
    for level in levels:
        assert runs[level]["cases"] == runs["off"]["cases"], level


def test_int8_group_linear_module_refuses_bad_layouts_and_runs_the_operator():
    from loom.quantization.linear import Int8GroupLinear, dequantized_weight

    with pytest.raises(ValueError, match=r"group_size=32 must be a multiple of 16 up to 512 that divides "
                                         r"in_features=48"):
        Int8GroupLinear(48, 4, group_size=32)
    with pytest.raises(ValueError, match="scale_dtype must be float16 or float32"):
        Int8GroupLinear(64, 4, scale_dtype=torch.bfloat16)
    module = Int8GroupLinear(64, 5, bias=True)
    x, w, s = _args(3, 64, 5, 32)
    module.weight, module.weight_scale = w, s
    module.bias.data.zero_()
    module.choose_kernel()
    assert module.kernel == ("native" if kernels_on() else "torch")
    assert torch.equal(module(x), op(x, w, s, 32))
    assert torch.equal(dequantized_weight(module), ops.int8_group_dequantize(w, s))
    with pytest.raises(TypeError, match="cannot cast a quantized Int8GroupLinear"):
        module.half()


def test_reference_in_chunks_of_one_group_gives_the_same_bits(monkeypatch):
    x, w, s = _args(5, 416, 37, 32)
    whole = ops.int8_group_reference(x, w, s, 32)
    monkeypatch.setattr(ops, "_LANE_SUMS", 1)  # one group's lane sums at a time
    assert torch.equal(ops.int8_group_reference(x, w, s, 32), whole)
    assert torch.equal(whole, op(x, w, s, 32))
