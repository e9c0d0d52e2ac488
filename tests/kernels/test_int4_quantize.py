"""loom::int4_quantize_asymmetric (csrc/int4_quantize.c) against its torch reference, bit for bit: packed nibbles,
float16 scales and zero points (the sign of a zero zero point included), so that a checkpoint saved by loom does
not depend on whether the kernels are on or which instruction-set level runs them. Shapes cover every branch of
the C code's reproduction of torch's float32 sum order (groups under one 8-float vector, leftover vectors, scalar
tails, the cascade from 512 weights per group), blocks of 8 groups with missing lanes, odd group sizes, and rows
that are constant, zero, all-positive, huge or tiny; NaN, inf and ranges no float16 scale holds raise the same
error on both paths."""
from __future__ import annotations

import hashlib
import os
import textwrap

import pytest
import torch
from loomtest import kernels_on, runs_at_levels

from loom.kernels import build, ops

HERE = os.path.dirname(os.path.abspath(__file__))

# (N, K, group): group sizes 32/64/128 and whole rows (-1), odd tails, groups under 8, odd groups, cascade sizes
SHAPES = [(5, 64, 32), (13, 256, 32), (7, 192, 64), (9, 384, 128), (6, 200, -1), (3, 6, 2), (5, 12, 6), (4, 30, 15),
          (3, 8, 8), (11, 24, 24), (2, 40, 40), (3, 4096, -1), (2, 8200, -1), (4, 1032, 1032), (17, 96, 32)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.float16 else t


def _assert_identical(got, want, what=""):
    for name, a, b in zip(("packed", "scale", "zero"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name)
        diff = (_bits(a) != _bits(b)).sum().item()
        assert diff == 0, f"{what}: {diff} {name} values differ"


def _weight(n, k, group, seed=0):
    """Gaussian rows at scales from 1e-3 to 1e2, then special rows: constant, +0.0, -0.0, mixed zeros (a zero
    minimum), all-positive, all-negative, a few zeros among positives, large (up to 4.5e5), tiny and subnormal."""
    g = torch.Generator().manual_seed(seed * 7919 + n * 131 + k)
    w = torch.randn(n, k, generator=g) * 10.0 ** torch.randint(-3, 3, (n, 1), generator=g).float()
    specials = [lambda r: r.fill_(0.37), lambda r: r.fill_(-2.5), lambda r: r.fill_(0.0), lambda r: r.fill_(-0.0),
                lambda r: r.abs_().add_(0.01), lambda r: r.abs_().neg_(),
                lambda r: r.abs_().index_fill_(0, torch.arange(0, k, 3), -0.0),
                lambda r: r.mul_(1.5e5).clamp_(-4.5e5, 4.5e5), lambda r: r.mul_(1e-9), lambda r: r.mul_(1e-41)]
    for i, fill in enumerate(specials[:n]):
        fill(w[(i + seed) % n])
    return w, k if group == -1 else group


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_torch_reference_bit_for_bit(n, k, group, seed):
    w, g = _weight(n, k, group, seed)
    _assert_identical(ops.int4_quantize_asymmetric(w, g), ops.int4_quantize_asymmetric_reference(w, g))


def _mirrored(n, k, group, seed=0):
    """Groups of values +-v in shuffled positions. Mirror-image candidates (shrinks (a, b) and (b, a)) then have the
    same squared errors in other positions, so which of them wins depends on the order of the float32 sums: on
    Gaussian weights a wrong order changed nothing in 4M weights; here it changes 3-7% of the groups."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randn(n, k // group, group // 2, generator=gen)
    w = torch.cat([half, -half], 2)
    return torch.gather(w, 2, torch.argsort(torch.rand(w.shape, generator=gen), 2)).reshape(n, k)


MIRRORED = [(256, 48, 6), (128, 176, 44), (64, 512, 32), (64, 512, 128), (64, 2048, 1024)]


@pytest.mark.parametrize("n,k,group", MIRRORED)
def test_sum_order_decides_mirror_image_ties_as_torch_does(n, k, group):
    w = _mirrored(n, k, group)
    _assert_identical(ops.int4_quantize_asymmetric(w, group), ops.int4_quantize_asymmetric_reference(w, group))


def test_a_zero_minimum_counts_as_plus_zero_whatever_the_signs_of_the_zeros():
    """The reference is the search loom shipped in torch, with one definition added: a group whose minimum is a
    zero counts it as +0.0 (torch's amin picks -0.0 or +0.0 by its reduction order), so an all-positive group and a
    group of +0.0 and -0.0 alike store the zero point -0.0 (0 once stored as an integer)."""
    w = torch.randn(4, 64).abs() + 0.1
    w[1, :32] = 0.0
    w[2, :32] = -0.0
    w[3, 5] = -0.0
    packed, scale, zero = ops.int4_quantize_asymmetric_reference(w, 32)
    assert torch.equal(zero[:, 0].view(torch.int16), torch.full((4,), -32768, dtype=torch.int16))
    assert torch.equal(ops.unpack_int4(packed)[1:3, :32], torch.zeros(2, 32, dtype=torch.uint8))
    _assert_identical(ops.int4_quantize_asymmetric(w, 32), (packed, scale, zero))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_searched_in_float32(dtype):
    w = torch.randn(9, 128).to(dtype)
    _assert_identical(ops.int4_quantize_asymmetric(w, 32), ops.int4_quantize_asymmetric_reference(w.float(), 32))


def test_strided_weights_and_threads_give_the_same_bits():
    w = torch.randn(96, 37).t()  # (37, 96) transposed view: GPT-2's Conv1D weights arrive like this
    want = ops.int4_quantize_asymmetric_reference(w, 32)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            _assert_identical(ops.int4_quantize_asymmetric(w, 32), want, f"{n} threads")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bad,message", [(float("nan"), "hold NaN or inf"), (float("inf"), "hold NaN or inf"),
                                         (-float("inf"), "hold NaN or inf"),
                                         (4e6, r"span \[.*, 4e\+06\], too wide for a float16 scale")])
@pytest.mark.parametrize("search", ["op", "reference"])
def test_values_int4_cannot_store_raise_naming_the_group(bad, message, search):
    w = torch.randn(3, 96)
    w[2, 40] = bad
    fn = ops.int4_quantize_asymmetric if search == "op" else ops.int4_quantize_asymmetric_reference
    with pytest.raises(ValueError, match=rf"int4_quantize_asymmetric: weight row 2, columns 32-63 {message}"):
        fn(w, 32)


def test_a_range_just_inside_float16_quantizes():
    w = torch.linspace(-6e5, 6e5, 64).reshape(2, 32)  # steps above 65504 only before the 0.8 shrink
    got = ops.int4_quantize_asymmetric(w, 32)
    _assert_identical(got, ops.int4_quantize_asymmetric_reference(w, 32))
    assert (got[1] > 0).all() and got[1].isfinite().all()


@pytest.mark.parametrize("group,message", [(48, "group_size=48 must divide K=64"), (0, "group_size=0 must divide"),
                                           (5, "group_size=5 must divide K=64")])
def test_bad_group_sizes_are_refused(group, message):
    with pytest.raises(ValueError, match=message):
        ops.int4_quantize_asymmetric(torch.randn(2, 64), group)


def test_odd_k_and_non_float_weights_are_refused():
    with pytest.raises(ValueError, match="K=33 must be even"):
        ops.int4_quantize_asymmetric(torch.randn(2, 33), 33)
    with pytest.raises(ValueError, match="floating-point"):
        ops.int4_quantize_asymmetric(torch.ones(2, 32, dtype=torch.int32), 32)


def test_empty_weight_and_meta_tensors():
    packed, scale, zero = ops.int4_quantize_asymmetric(torch.randn(0, 64), 32)
    assert packed.shape == (0, 32) and scale.shape == zero.shape == (0, 2)
    packed, scale, zero = torch.ops.loom.int4_quantize_asymmetric(torch.randn(5, 64, device="meta"), 32)
    assert packed.shape == (5, 32) and packed.device.type == "meta" and scale.dtype == torch.float16


# -- every instruction-set level the CPU has, and the kernels off, each in its own process ------------------------
_CHILD = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from loom.kernels import build, ops
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from test_int4_quantize import MIRRORED, SHAPES, _mirrored, _weight
    digests = []
    for w, g in [_weight(*shape) for shape in SHAPES] + [(_mirrored(*shape), shape[2]) for shape in MIRRORED]:
        h = hashlib.sha256()
        for t in ops.int4_quantize_asymmetric(w, g):
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        digests.append(h.hexdigest())
    try:
        bad = torch.randn(2, 64)
        bad[1, 3] = float("nan")
        ops.int4_quantize_asymmetric(bad, 32)
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({"describe": build.describe(), "digests": digests, "error": error}))
""")


def test_every_level_and_the_kernels_off_give_the_same_bits():
    want = []
    for w, g in [_weight(*shape) for shape in SHAPES] + [(_mirrored(*shape), shape[2]) for shape in MIRRORED]:
        h = hashlib.sha256()
        for t in ops.int4_quantize_asymmetric_reference(w, g):
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        want.append(h.hexdigest())
    levels = build.supported_levels() if kernels_on() else []
    for level, run in runs_at_levels(_CHILD, HERE, os.path.dirname(HERE), levels=levels).items():
        bad = [shape for shape, a, b in zip(SHAPES + MIRRORED, run["digests"], want) if a != b]
        assert not bad, f"{level}: {bad} differ from the torch reference"
        assert run["error"].startswith("loom::int4_quantize_asymmetric: weight row 1, columns 0-31 hold NaN"), run
