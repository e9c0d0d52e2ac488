"""loom::int4_linear_a8 (int4 group-wise weights x 8-bit activations, the opt-in decode kernel): the C kernel gives
bit for bit the arithmetic csrc/int4a8.c states, which its torch path (`int4_a8_reference`, used with the kernels
off) computes too; so every level, every row count and the kernels off agree to the bit. Also: the reference
against the recipe written out in plain loops, within the int8 rounding bound of the dequantized float matmul,
odd N and K tails, group sizes up to a whole row, float16/float32 scales, symmetric and asymmetric layouts,
inf/NaN rows, threads, gradients, fake tensors and bad input."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from loomtest import kernels_on, runs_at_levels

from loom.kernels import build, ops

native = pytest.mark.skipif(not kernels_on(), reason="needs loom's C kernels (Linux x86-64 with AVX2 and gcc)")
op = torch.ops.loom.int4_linear_a8

ROWS = [1, 2, 3, 4, 5, 7, 8, 16, 17]
# (K, N, G): K of 1 block, 13 blocks (< 16 lanes), 24 (the bench's 768: a partial lane group), 64; K % 128 == 32 and
# K % 64 == 32 (the partial last weight load of each level); groups of 32, 64, 128 and a whole row; N: partial tiles
SHAPES = [(32, 5, 32), (416, 37, 32), (768, 9, 64), (2048, 6, 128), (544, 3, 544), (96, 70, 32)]


def _args(rows, k, n, g, seed=0, half=True, symmetric=False):
    gen = torch.Generator().manual_seed(seed * 7919 + rows * 31 + k + n + g)
    x = torch.randn(rows, k, generator=gen) * 3
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    s = torch.rand(n, k // g, generator=gen) / 20
    z = None if symmetric else torch.randint(0, 16, (n, k // g), generator=gen).float()
    dtype = torch.float16 if half else torch.float32
    return x, packed, s.to(dtype), None if z is None else z.to(dtype)


def _bits(t):
    return t.contiguous().view(torch.int32)


def _assert_same_bits(a, b):
    assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
    keep = ~a.isnan()
    assert torch.equal(_bits(a)[keep], _bits(b)[keep])  # -0.0 and +0.0 too


def _within_int8_bound(got, x, packed, s, z):
    w = ops.int4_dequantize_reference(packed, s, z).double()
    exact = F.linear(x.double(), w)
    # each activation rounds by at most (its block's max|x|) / 254, moving an output by that times |w| summed over
    # the block; plus float32 roundings of the block products and their sum
    blocks = x.double().view(x.shape[0], -1, 32).abs().amax(2) / 254  # (M, K/32)
    wsum = w.abs().view(w.shape[0], -1, 32).sum(2)  # (N, K/32)
    bound = blocks @ wsum.t() + 1e-5 * exact.abs().amax().clamp(min=1)
    assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() - bound).max()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n,g", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_same_bits_as_the_stated_arithmetic_and_within_the_int8_bound(rows, k, n, g, symmetric):
    x, packed, s, z = _args(rows, k, n, g, half=not symmetric, symmetric=symmetric)
    x[0, :32] = 0  # an all-zero block (scale 0)
    got = op(x, packed, s, z, g)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    _assert_same_bits(got, ops.int4_a8_reference(x, packed, s, z, g))
    _within_int8_bound(got, x, packed, s, z)


def test_reference_is_the_stated_arithmetic_written_out():
    """The torch path itself against csrc/int4a8.c's recipe, written out with int64 block sums and Python loops."""
    x, packed, s, z = _args(2, 13 * 32, 3, 32)
    x[1, 64:96] *= 1e-32  # a block below the 1e-30 threshold counts as zero
    u = ops.unpack_int4(packed).long()
    y = torch.zeros(2, 3)
    for m in range(2):
        for n in range(3):
            total = torch.tensor(0.0)
            for b in range(13):
                xb = x[m, 32 * b:32 * b + 32]
                amax = xb.abs().max()
                if amax >= 1e-30:
                    d = amax / torch.tensor(127.0)
                    q = torch.round(xb * (torch.tensor(127.0) / amax)).long()
                else:
                    d, q = torch.tensor(0.0), torch.zeros(32, dtype=torch.long)
                isum = (u[n, 32 * b:32 * b + 32] * q).sum()
                total = total + ((isum.float() - z[n, b].float() * q.sum().float()) * s[n, b].float()) * d
            y[m, n] = total
    _assert_same_bits(ops.int4_a8_reference(x, packed, s, z, 32), y)


def test_tiles_layout_and_the_op_without_tiles():
    """ops.int4_a8_tiles is the layout the header states; the operator makes it itself when not given one."""
    x, packed, s, z = _args(3, 64, 20, 32)
    t = ops.int4_a8_tiles(packed, s, z, 32)
    assert t.dtype == torch.uint8 and t.numel() == 2 * 2 * (256 + 16 * 2 * 2)  # 2 tiles (20 rows), 2 blocks
    blob = t.view(2, 2, 256 + 64)
    tile, block, row = 1, 1, 3  # weight row 19, columns 32..63
    nibbles = blob[tile, block, :256].view(4, 16, 4)[:, row].reshape(-1)
    assert torch.equal(nibbles, packed[16 + row, 16:32])
    assert torch.equal(blob[tile, block, 256:288].clone().view(torch.float16)[row], s[16 + row, 1])
    assert torch.equal(blob[tile, block, 288:320].clone().view(torch.float16)[row], z[16 + row, 1])
    assert not blob[tile, :, :256].view(2, 4, 16, 4)[:, :, 4:].any()  # rows 20..31 are zero
    _assert_same_bits(op(x, packed, s, z, 32, t), op(x, packed, s, z, 32))


def test_float16_and_float32_scales_give_the_same_bits_for_the_same_values():
    x, packed, s, z = _args(3, 256, 11, 32)
    _assert_same_bits(op(x, packed, s.float(), z.float(), 32), op(x, packed, s, z, 32))


def test_a_rows_result_does_not_depend_on_the_other_rows():
    x, packed, s, z = _args(17, 416, 37, 32)
    alone = torch.cat([op(x[i:i + 1], packed, s, z, 32) for i in (0, 5, 16)])
    _assert_same_bits(op(x, packed, s, z, 32)[[0, 5, 16]], alone)
    _assert_same_bits(op(x[:6], packed, s, z, 32)[5], alone[1])


@native
def test_several_threads_give_the_one_thread_result():
    x, packed, s, z = _args(5, 416, 301, 32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, packed, s, z, 32)
        torch.set_num_threads(max(2, old))
        _assert_same_bits(op(x, packed, s, z, 32), one)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("rows", [1, 3])
def test_inf_and_nan_rows_propagate_as_in_a_float_matmul(rows):
    x, packed, s, z = _args(rows, 96, 6, 32, symmetric=True)
    packed[2, 3] = 0x88  # columns 6 and 7 of row 2 dequantize to 0: inf * 0 = NaN there
    x[0, 7] = float("inf")
    if rows > 1:
        x[1, 40] = float("nan")
    got = op(x, packed, s, z, 32)
    want = F.linear(x.double(), ops.int4_dequantize_reference(packed, s, z).double()).float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert got[0, 2].isnan() and got[0, 0].isinf()
    finite = want.isfinite().all(1)
    _assert_same_bits(got[finite], op(x[finite], packed, s, z, 32))
    torch.testing.assert_close(got, ops.int4_a8_reference(x, packed, s, z, 32), rtol=0, atol=0, equal_nan=True)


def test_zero_rows_and_empty_shapes():
    x, packed, s, z = _args(4, 64, 3, 32)
    x[1] = 0
    assert torch.equal(op(x, packed, s, z, 32)[1], torch.zeros(3))
    assert op(x[:0], packed, s, z, 32).shape == (0, 3)
    assert op(x, packed[:0], s[:0], z[:0], 32).shape == (4, 0)


def test_batched_and_bf16_inputs():
    x, packed, s, z = _args(6, 64, 5, 32)
    _assert_same_bits(op(x.view(2, 3, 64), packed, s, z, 32).view(6, 5), op(x, packed, s, z, 32))
    xb = x.bfloat16()
    got = op(xb, packed, s, z, 32)
    assert got.dtype == torch.bfloat16 and torch.equal(got, op(xb.float(), packed, s, z, 32).bfloat16())


def test_gradient_to_the_input_and_none_to_the_scale():
    x, packed, s, z = _args(3, 64, 5, 32, half=False)
    x.requires_grad_(True)
    op(x, packed, s, z, 32).sum().backward()
    torch.testing.assert_close(x.grad, ops.int4_dequantize_reference(packed, s, z).sum(0).expand(3, -1))
    s.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="int4_linear_a8 has no gradient for scale or zero"):
        op(x, packed, s, z, 32).sum().backward()


def test_fake_tensors_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, packed, s, z = _args(2, 64, 5, 32)
    with FakeTensorMode() as mode:
        out = op(mode.from_tensor(x), mode.from_tensor(packed), mode.from_tensor(s), mode.from_tensor(z), 32)
    assert out.shape == (2, 5)
    compiled = torch.compile(lambda a: op(a, packed, s, z, 32), backend="eager", fullgraph=True)
    _assert_same_bits(compiled(x), op(x, packed, s, z, 32))


@pytest.mark.parametrize("args,match", [
    (lambda x, p, s, z: (x, p, s, z, 16), r"group_size=16 must be a multiple of 32"),
    (lambda x, p, s, z: (x, p, s, z, 96), r"group_size=96 must divide K=64"),
    (lambda x, p, s, z: (x, p.char(), s, z, 32), r"packed must be uint8 \(N, K/2\)"),
    (lambda x, p, s, z: (x, p, s.double(), z, 32), r"scale must be float16 or float32 \(5, 2\)"),
    (lambda x, p, s, z: (x, p, s, z.float(), 32), r"zero must match scale"),
    (lambda x, p, s, z: (x[:, :32], p, s, z, 32), r"x has 32 features but the packed weight expects 64"),
    (lambda x, p, s, z: (x.long(), p, s, z, 32), r"x must be floating point"),
    (lambda x, p, s, z: (x, p, s, z, 32, torch.zeros(7, dtype=torch.uint8)),
     r"tiles must be the uint8 \(640,\) layout int4_a8_tiles makes of these weights, got torch.uint8 \(7,\)"),
])
def test_bad_input_is_named(args, match):
    x, packed, s, z = _args(2, 64, 5, 32)
    with pytest.raises(ValueError, match=r"loom::int4_linear_a8: " + match):
        op(*args(x, packed, s, z))


def test_reference_in_chunks_gives_the_same_bits(monkeypatch):
    x, packed, s, z = _args(5, 2048, 7, 64)
    whole = ops.int4_a8_reference(x, packed, s, z, 64)
    monkeypatch.setattr(ops, "_LANE_SUMS", 1)  # one block at a time
    _assert_same_bits(ops.int4_a8_reference(x, packed, s, z, 64), whole)
    _assert_same_bits(whole, op(x, packed, s, z, 64))


# -- every level this CPU supports and the kernels off, each in its own process: the same bits -----------------------
_CHILD = textwrap.dedent("""
    import hashlib, json, sys, torch
    from loom.kernels import build
    torch.set_num_threads(1)
    out = {"describe": build.describe(), "cases": []}
    for seed, (m, k, n, g, sym) in enumerate(json.loads(sys.argv[1])):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k, generator=gen) * 2
        x[0, 32:64] = 0
        p = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
        s = torch.rand(n, k // g, generator=gen) / 20
        z = None if sym else torch.randint(0, 16, (n, k // g), generator=gen).half()
        y = torch.ops.loom.int4_linear_a8(x, p, s if sym else s.half(), z, g)
        out["cases"].append(hashlib.sha256(y.numpy().tobytes()).hexdigest())
    print(json.dumps(out))
""")
LEVEL_CASES = [(m, k, n, g, sym) for m in (1, 2, 3, 4, 5, 8, 16) for (k, n, g, sym) in
               ((416, 37, 32, True), (768, 6, 64, False), (544, 5, 32, False), (2048, 3, 2048, True))]


def test_every_supported_level_and_the_kernels_off_give_the_same_bits():
    levels = build.supported_levels()
    runs = runs_at_levels(_CHILD, json.dumps(LEVEL_CASES), levels=levels)
    for level in levels:
        assert runs[level]["cases"] == runs["off"]["cases"], level
    assert len(set(runs["off"]["cases"])) == len(LEVEL_CASES)  # the cases differ: a constant output would not


def test_tiles_of_a_group_size_that_is_not_a_multiple_of_32_are_refused_by_name():
    """The attribute set by hand (not through set_activation_bits, which checks first): a named error, not a reshape
    failure inside the layout."""
    packed = torch.zeros(16, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size=16 must be a multiple of 32"):
        ops.int4_a8_tiles(packed, torch.ones(16, 4), None, 16)
