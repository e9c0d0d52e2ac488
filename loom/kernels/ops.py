"""loom's kernels as torch operators (`torch.ops.loom.*`): schema, checks, CPU implementation, fake (shape-only)
implementation and autograd formula for each.

The dispatcher is the safety boundary: a DTensor, FakeTensor or other subclass is handled by its own dispatch before
any of this runs (and without a sharding rule gets DTensor's error naming the operator), meta and fake tensors get
the fake implementation, CUDA has no implementation here (torch's error names the operator), and the CPU
implementations below check dtypes, shapes and layouts before a pointer reaches C. Where the library is not loaded
(kernels off, no compiler) the CPU implementations compute the same thing with torch ops, so calling an operator is
always valid.

Each operator also has a plain function of the same name here (`dense_linear`, `rms_norm`, ...), which is what
loom's modules call once `loom.kernels.policy` has said the kernel applies (plain CPU tensors). In plain eager code
it calls the checked CPU implementation without the dispatcher hop, which costs ~13 us per call (15% of a batch-1
decode step); whenever something records or transforms ops (torch.compile, jit.trace, a dispatch mode such as
FakeTensorMode or a FLOP counter, a functorch transform, autograd) it calls the operator, so that sees every call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loom.kernels import build
from loom.kernels.policy import INT8_GROUP_MAX, MAX_ROWS, rows_of
from loom.kernels.threads import pool_threads

_lib = torch.library.Library("loom", "DEF")
_FLOATS = (torch.float32, torch.bfloat16)
_STRIDED = torch.strided
_F32 = torch.float32
_SCALES = (torch.float16, torch.float32)


def _define(schema: str, cpu, fake, backward=None, setup=None, *, grad_args: tuple[int, ...] = ()):
    """Register the operator; return the plain function callers use (see the module docstring): `cpu` itself when
    nothing records ops and no argument at `grad_args` needs a gradient, the operator otherwise."""
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, cpu, "CPU")
    torch.library.register_fake(f"loom::{name}", fake, lib=_lib)
    if backward is not None:
        # The autograd engine calls a backward from C++. Inside a torch.compile'd function that broke its graph at
        # `.backward()`, Dynamo would trace that Python frame as a new one, and a backward handing raw data pointers
        # to C (loss, attention, rope) then wrote into tensors the traced code had replaced (gradients of 1e30 were
        # seen): backwards always run as written.
        torch.library.register_autograd(f"loom::{name}", torch.compiler.disable(backward), setup_context=setup,
                                        lib=_lib)
    op = getattr(torch.ops.loom, name).default

    def call(*args):
        return cpu(*args) if _eager(args, grad_args) else op(*args)

    call.__name__ = call.__qualname__ = name
    return call


def _check(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise ValueError(f"loom::{op}: {message}")


def _check_strided(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            _check(t.layout == torch.strided, op, f"{name} must be a dense (strided) tensor, got {t.layout}")


def _check_float(op: str, name: str, t: torch.Tensor, allowed=_FLOATS) -> None:
    _check(t.dtype in allowed, op, f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: "
           f"{', '.join(str(d).replace('torch.', '') for d in allowed)}")


def _eager(args: tuple, grad_args: tuple[int, ...]) -> bool:
    """Nothing records or transforms ops now, and no gradient is wanted for the arguments at `grad_args`."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active()
                or (torch.is_grad_enabled() and any(args[i] is not None and args[i].requires_grad
                                                    for i in grad_args)))


def eager_now() -> bool:
    """Nothing records or transforms ops now (no torch.compile, jit.trace, dispatch mode or functorch transform): a
    fast path that reads values back to the host or keeps Python state may run."""
    return _eager((), ())


# -- dense linear: x (..., K) @ weight (N, K).T + bias ------------------------------------------------------------
def _dense_checks(x, weight, bias) -> None:
    _check_strided("dense_linear", x=x, weight=weight, bias=bias)
    _check_float("dense_linear", "x", x)
    _check_float("dense_linear", "weight", weight)
    _check(x.dim() >= 1 and weight.dim() == 2, "dense_linear",
           f"expects x (..., K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    _check(x.shape[-1] == weight.shape[1], "dense_linear",
           f"x has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if bias is not None:
        _check_float("dense_linear", "bias", bias)
        _check(tuple(bias.shape) == (weight.shape[0],), "dense_linear",
               f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def _dense_cpu(x, weight, bias):
    if not (x.dtype in _FLOATS and weight.dtype in _FLOATS and weight.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == weight.shape[1] and x.layout == _STRIDED and weight.layout == _STRIDED
            and (bias is None or (bias.dtype in _FLOATS and bias.dim() == 1 and bias.shape[0] == weight.shape[0]
                                  and bias.layout == _STRIDED))):
        _dense_checks(x, weight, bias)  # raises, naming what is wrong
    n, k = weight.shape
    lib = build.library()
    if lib is None:
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    x2, w = x.contiguous(), weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    m, bf16 = rows_of(x), torch.bfloat16
    if m and n:
        status = lib.loom_dense_gemm(x2.data_ptr(), x.dtype is bf16, w.data_ptr(), w.dtype is bf16,
                                     None if b is None else b.data_ptr(), b is not None and b.dtype is bf16,
                                     y.data_ptr(), x.dtype is bf16, m, n, k, pool_threads())
        if status != 0:
            raise MemoryError(f"loom::dense_linear: could not allocate {m}x{k} activation scratch")
    elif m:
        y.zero_()
        if bias is not None:
            y += bias.to(x.dtype)
    return y


def _dense_fake(x, weight, bias):
    _dense_checks(x, weight, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _dense_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _dense_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = (grad @ weight.to(grad.dtype)).to(x.dtype)
    if ctx.needs_input_grad[1]:
        gw = (grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, gw, gb


dense_linear = _define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", _dense_cpu, _dense_fake,
                       _dense_backward, _dense_setup, grad_args=(0, 1, 2))


# -- dense linear then GELU (inference): gelu(x @ weight.T + bias), the activation applied in the GEMM's last pass --
def _dense_gelu_checks(x, weight, bias) -> None:
    _dense_checks(x, weight, bias)
    _check(x.dtype is _F32 and weight.dtype is _F32 and (bias is None or bias.dtype is _F32), "dense_gelu",
           f"takes fp32 x, weight and bias, got {x.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")


def _dense_gelu_cpu(x, weight, bias):
    _dense_gelu_checks(x, weight, bias)
    n, k = weight.shape
    m = rows_of(x)
    lib = build.library()
    if lib is None or m <= MAX_ROWS or not build.has("loom_dense_blocked"):
        return F.gelu(F.linear(x, weight, bias))
    x2, w = x.contiguous(), weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    if lib.loom_dense_gelu(x2.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), m, n, k,
                           pool_threads()) != 0:
        raise MemoryError(f"loom::dense_gelu: could not allocate the packed {n}x{k} weight")
    return y


def _dense_gelu_fake(x, weight, bias):
    _dense_gelu_checks(x, weight, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_dense_gelu = _define("dense_gelu(Tensor x, Tensor weight, Tensor? bias) -> Tensor", _dense_gelu_cpu,
                      _dense_gelu_fake)


def dense_gelu(x, weight, bias):
    """GELU (the erf form, as nn.GELU()) of x @ weight.T + bias, all fp32, for inference: more than decode-size rows
    run loom's blocked GEMM with the activation applied while each output block is in cache (within 2e-7 of torch's
    GELU, whose erf is the same approximation); otherwise torch's ops, which also serve a call that wants a
    gradient (the operator has no backward of its own)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad):
        return F.gelu(F.linear(x, weight, bias))
    return _dense_gelu(x, weight, bias)


# -- RMSNorm: weight * x / sqrt(mean(x^2) + eps) over the last dim ------------------------------------------------
def _norm_checks(x, weight, op: str = "rms_norm") -> None:
    _check_strided(op, x=x, weight=weight)
    _check_float(op, "x", x)
    _check(weight.dtype == x.dtype, op, f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    _check(x.dim() >= 1 and tuple(weight.shape) == (x.shape[-1],), op,
           f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1] if x.dim() else '?'},)")


def rms_norm_reference(x, weight, eps: float):
    """The torch computation the kernel reproduces: fp32 normalisation, rounded to x's dtype, times the weight."""
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _norm_cpu(x, weight, eps):
    if not (x.dtype in _FLOATS and weight.dtype == x.dtype and weight.dim() == 1 and x.dim() >= 1
            and weight.shape[0] == x.shape[-1] and x.layout == _STRIDED and weight.layout == _STRIDED):
        _norm_checks(x, weight)
    lib = build.library()
    if lib is None:
        return rms_norm_reference(x, weight, eps)
    x = x.contiguous()
    w = weight.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.shape[-1]
    lib.loom_rms_norm(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.dtype is torch.bfloat16, rows_of(x), n, eps,
                      pool_threads())
    return y


def _norm_fake(x, weight, eps):
    _norm_checks(x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _norm_backward(ctx, grad):
    # y_i = w_i x_i r with r = (mean(x^2) + eps)^-1/2:  dx_j = r g_j w_j - x_j r^3 mean_i(g_i w_i x_i)
    x, weight = ctx.saved_tensors
    xf, gf, wf = x.float(), grad.float(), weight.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
    gw_x = gf * wf
    gx = r * gw_x - xf * r.pow(3) * (gw_x * xf).mean(-1, keepdim=True) if ctx.needs_input_grad[0] else None
    gw = (gf * xf * r).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
    return (None if gx is None else gx.to(x.dtype)), (None if gw is None else gw.to(weight.dtype)), None


rms_norm = _define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", _norm_cpu, _norm_fake,
                   _norm_backward, _norm_setup, grad_args=(0, 1))


# -- Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + weight), in fp32, rounded once --------------------------------
def gemma_rms_norm_reference(x, weight, eps: float):
    """The torch computation the kernel reproduces (the reference's Gemma norm)."""
    return (torch.rms_norm(x.float(), (x.shape[-1],), None, eps) * (1.0 + weight.float())).to(x.dtype)


def _norm_1p_cpu(x, weight, eps):
    if not (x.dtype in _FLOATS and weight.dtype == x.dtype and weight.dim() == 1 and x.dim() >= 1
            and weight.shape[0] == x.shape[-1] and x.layout == _STRIDED and weight.layout == _STRIDED):
        _norm_checks(x, weight, "gemma_rms_norm")
    lib = build.library()
    if lib is None:
        return gemma_rms_norm_reference(x, weight, eps)
    x = x.contiguous()
    w = weight.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.loom_rms_norm_1p(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.dtype is torch.bfloat16, rows_of(x),
                         x.shape[-1], eps, pool_threads())
    return y


def _norm_1p_fake(x, weight, eps):
    _norm_checks(x, weight, "gemma_rms_norm")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _norm_1p_backward(ctx, grad):
    # y = (1 + w) * rms_norm(x) without a weight: the plain norm's formula with the weight 1 + w
    x, weight = ctx.saved_tensors
    xf, gf, wf = x.float(), grad.float(), 1.0 + weight.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
    gw_x = gf * wf
    gx = r * gw_x - xf * r.pow(3) * (gw_x * xf).mean(-1, keepdim=True) if ctx.needs_input_grad[0] else None
    gw = (gf * xf * r).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
    return (None if gx is None else gx.to(x.dtype)), (None if gw is None else gw.to(weight.dtype)), None


gemma_rms_norm = _define("gemma_rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", _norm_1p_cpu,
                         _norm_1p_fake, _norm_1p_backward, _norm_setup, grad_args=(0, 1))


# -- single-query attention: softmax(q k^T * scale, mask) v, one query per head ------------------------------------
ATTENTION_MAX_HEAD_DIM = 512  # the kernel's stack buffers (csrc/attention.c ATTN_MAX_D)


def _attn_checks(q, k, v, mask) -> None:
    op = "decode_attention"
    _check_strided(op, q=q, k=k, v=v, mask=mask)
    _check_float(op, "q", q)
    _check(k.dtype == q.dtype and v.dtype == q.dtype, op,
           f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.shape[2] == 1, op,
           f"expects q (B, H, 1, D) and k, v (B, Hkv, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
           f"{tuple(v.shape)}")
    B, H, _, D = q.shape
    _check(k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, op,
           f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, Hkv, L, D={D})")
    _check(k.shape[1] > 0 and H % k.shape[1] == 0, op, f"{H} query heads are not a multiple of {k.shape[1]} kv heads")
    _check(D <= ATTENTION_MAX_HEAD_DIM, op, f"head dim {D} exceeds {ATTENTION_MAX_HEAD_DIM}")
    _check(k.shape[2] > 0, op, "needs at least one key (L = 0)")
    if mask is not None:
        _check(mask.dtype == torch.bool and mask.dim() == 4 and tuple(mask.shape[1:]) == (1, 1, k.shape[2])
               and mask.shape[0] in (1, B), op,
               f"mask must be bool (B or 1, 1, 1, L={k.shape[2]}), got {mask.dtype} {tuple(mask.shape)}")


def attention_reference(q, k, v, mask, scale: float):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _unit_stride_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _attn_cpu(q, k, v, mask, scale):
    if not (q.dtype in _FLOATS and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 4 and k.dim() == 4
            and q.shape[2] == 1 and k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3]
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0 and q.shape[3] <= ATTENTION_MAX_HEAD_DIM
            and k.shape[2] > 0 and q.layout == _STRIDED and k.layout == _STRIDED and v.layout == _STRIDED
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                                  and mask.shape[2] == 1 and mask.shape[3] == k.shape[2]
                                  and mask.shape[0] in (1, q.shape[0]) and mask.layout == _STRIDED))):
        _attn_checks(q, k, v, mask)
    lib = build.library()
    B, H, _, D = q.shape
    out = torch.empty(B, 1, H, D, dtype=q.dtype)
    if B == 0:
        return out.transpose(1, 2)
    if lib is None:  # the kernel's arithmetic (fp32 sums, one rounding) and its output layout
        out.transpose(1, 2).copy_(attention_reference(q.float(), k.float(), v.float(), mask, scale))
        return out.transpose(1, 2)
    q, k, v = _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v)
    mask = None if mask is None else _unit_stride_last(mask)
    m_sb = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    status = lib.loom_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), None if mask is None else mask.data_ptr(), m_sb,
        out.data_ptr(), q.dtype is torch.bfloat16, B, H, k.shape[1], k.shape[2], D, scale, pool_threads())
    if status != 0:
        raise MemoryError(f"loom::decode_attention: could not allocate scores for {k.shape[2]} keys")
    return out.transpose(1, 2)  # a view of (B, 1, H, D): the usual transpose(1, 2).reshape after it is free


def _attn_fake(q, k, v, mask, scale):
    _attn_checks(q, k, v, mask)
    B, H, _, D = q.shape
    return q.new_empty(B, 1, H, D).transpose(1, 2)


def _attn_setup(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale = scale


def _attn_backward(ctx, grad):
    q, k, v, mask = ctx.saved_tensors
    B, H, _, D = q.shape
    hkv, L = k.shape[1], k.shape[2]
    rep = H // hkv
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)  # (B, H, L, D)
    s = (q.float() @ kf.transpose(-1, -2)) * ctx.scale  # (B, H, 1, L)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1).masked_fill((s == float("-inf")).all(-1, keepdim=True), 0.0)  # nothing to attend to: zeros
    g = grad.float()
    gp = g @ vf.transpose(-1, -2)  # (B, H, 1, L)
    gs = p * (gp - (gp * p).sum(-1, keepdim=True)) * ctx.scale
    gq = (gs @ kf).to(q.dtype)
    gk = (gs.transpose(-1, -2) @ q.float()).view(B, hkv, rep, L, D).sum(2).to(k.dtype)
    gv = (p.transpose(-1, -2) @ g).view(B, hkv, rep, L, D).sum(2).to(v.dtype)
    return gq, gk, gv, None, None


decode_attention = _define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor",
                           _attn_cpu, _attn_fake, _attn_backward, _attn_setup, grad_args=(0, 1, 2))


# -- a decode step's RoPE + KV-cache write + single-query attention, one layer in one call ---------------------------
def _rope_attn_checks(q, k, v, cos, sin, k_cache, v_cache, pos, length, mask) -> None:
    op = "rope_cache_attention"
    _check_strided(op, q=q, k=k, v=v, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, mask=mask)
    _check_float(op, "q", q)
    _check(all(t.dtype == q.dtype for t in (k, v, cos, sin, k_cache, v_cache)), op,
           "q, k, v, cos, sin and the caches must share a dtype")
    _check(q.dim() == 4 and q.shape[1] == 1 and k.dim() == 4 and k.shape == v.shape and k.shape[:2] == q.shape[:2]
           and k.shape[3] == q.shape[3] and q.shape[3] % 2 == 0 and k.shape[2] > 0 and q.shape[2] % k.shape[2] == 0,
           op, f"expects q (B, 1, H, D) and k, v (B, 1, Hkv, D) with even D, got {tuple(q.shape)}, "
           f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, _, H, D = q.shape
    _check(all(t.stride(-1) == 1 and t.stride(-2) == D for t in (q, k, v)), op,
           "q, k and v must have contiguous heads (stride D between heads, 1 within)")
    _check(cos.shape == sin.shape and cos.dim() == 4 and cos.shape[0] in (1, B) and cos.shape[1:] == (1, 1, D)
           and cos.stride() == sin.stride() and cos.stride(-1) == 1, op,
           f"cos and sin must be (B or 1, 1, 1, D={D}) with unit last stride, got {tuple(cos.shape)}")
    _check(k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.dim() == 4
           and k_cache.shape[:2] == (B, k.shape[2]) and k_cache.shape[3] == D and k_cache.stride(3) == 1
           and k_cache.stride(2) == D, op, f"caches must be (B, Hkv, capacity, D) with contiguous positions, got "
           f"{tuple(k_cache.shape)}")
    _check(0 <= pos < length <= k_cache.shape[2], op,
           f"needs 0 <= pos < length <= capacity, got pos {pos}, length {length}, capacity {k_cache.shape[2]}")
    _check(D <= ATTENTION_MAX_HEAD_DIM, op, f"head dim {D} exceeds {ATTENTION_MAX_HEAD_DIM}")
    if mask is not None:
        _check(mask.dtype == torch.bool and mask.dim() == 4 and tuple(mask.shape[1:]) == (1, 1, length)
               and mask.shape[0] in (1, B) and mask.stride(-1) == 1, op,
               f"mask must be bool (B or 1, 1, 1, length={length}), got {mask.dtype} {tuple(mask.shape)}")


def rope_reference(x, cos, sin):
    """RoPE as loom's models apply it (rotate-half's sign is in sin): x * cos + swap_halves(x) * sin, in x's dtype."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), -1) * sin


def _rope_attn_fits(q, k, v, cos, sin, kc, vc, pos, length, mask) -> bool:
    """`_rope_attn_checks` as one expression that raises nothing (it runs once per layer and decode step)."""
    qs, ks, cs, kcs, dtype = q.shape, k.shape, cos.shape, kc.shape, q.dtype
    if not (len(qs) == 4 and len(ks) == 4 and len(cs) == 4 and len(kcs) == 4 and dtype in _FLOATS):
        return False
    B, D = qs[0], qs[3]
    return (k.dtype is dtype and v.dtype is dtype and cos.dtype is dtype and sin.dtype is dtype and kc.dtype is dtype
            and vc.dtype is dtype and qs[1] == 1 and ks[0] == B and ks[1] == 1 and ks[3] == D and v.shape == ks
            and D % 2 == 0 and D <= ATTENTION_MAX_HEAD_DIM and ks[2] > 0 and qs[2] % ks[2] == 0
            and q.stride(3) == 1 and q.stride(2) == D and k.stride(3) == 1 and k.stride(2) == D
            and v.stride(3) == 1 and v.stride(2) == D and sin.shape == cs and cs[0] in (1, B) and cs[1] == 1
            and cs[2] == 1 and cs[3] == D and cos.stride() == sin.stride() and cos.stride(3) == 1
            and vc.shape == kcs and kcs[0] == B and kcs[1] == ks[2] and kcs[3] == D and kc.stride() == vc.stride()
            and kc.stride(3) == 1 and kc.stride(2) == D and 0 <= pos < length <= kcs[2]
            and q.layout is _STRIDED and k.layout is _STRIDED and v.layout is _STRIDED and cos.layout is _STRIDED
            and sin.layout is _STRIDED and kc.layout is _STRIDED and vc.layout is _STRIDED
            and (mask is None or (mask.dtype is torch.bool and mask.layout is _STRIDED and mask.dim() == 4
                                  and mask.shape[0] in (1, B) and mask.shape[1] == 1 and mask.shape[2] == 1
                                  and mask.shape[3] == length and mask.stride(3) == 1)))


def _rope_attn_cpu(q, k, v, cos, sin, k_cache, v_cache, pos, length, mask, scale):
    if not _rope_attn_fits(q, k, v, cos, sin, k_cache, v_cache, pos, length, mask):
        _rope_attn_checks(q, k, v, cos, sin, k_cache, v_cache, pos, length, mask)  # raises, naming what is wrong
    B, _, H, D = q.shape
    lib = build.library()
    if lib is None:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, 1, D)
        k_cache[:, :, pos:pos + 1] = rope_reference(k, cos, sin)
        v_cache[:, :, pos:pos + 1] = v
        out = _attn_cpu(rope_reference(q, cos, sin), k_cache[:, :, :length], v_cache[:, :, :length], mask, scale)
        return out.transpose(1, 2).reshape(B, 1, H * D)
    out = torch.empty(B, 1, H * D, dtype=q.dtype)
    if B and lib.loom_rope_cache_attention(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(),
            sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0, k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.stride(0), k_cache.stride(1), pos, None if mask is None else mask.data_ptr(),
            0 if mask is None or mask.shape[0] == 1 else mask.stride(0), out.data_ptr(), q.dtype is torch.bfloat16,
            B, H, k.shape[2], length, D, scale, pool_threads()):
        raise MemoryError(f"loom::rope_cache_attention: could not allocate scores for {length} keys")
    return out


def _rope_attn_fake(q, k, v, cos, sin, k_cache, v_cache, pos, length, mask, scale):
    _rope_attn_checks(q, k, v, cos, sin, k_cache, v_cache, pos, length, mask)
    return q.new_empty(q.shape[0], 1, q.shape[2] * q.shape[3])


rope_cache_attention = _define(
    "rope_cache_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
    "Tensor(b!) v_cache, int pos, int length, Tensor? mask, float scale) -> Tensor",
    _rope_attn_cpu, _rope_attn_fake)


# -- a decode step's attention half of a pre-norm layer, plus the MLP's input projections -------------------------
_LAYER_WEIGHTS = ("wq", "wk", "wv", "wo", "wg", "wu")


def _layer_checks(x, ln1, ln2, weights, biases, cos, sin, k_cache, v_cache, pos, length, mask) -> None:
    op = "decode_layer_attention"
    _check(x.dim() == 3 and x.shape[1] == 1 and x.is_contiguous(), op,
           f"x must be a contiguous (B, 1, hidden) tensor, got {tuple(x.shape)}")
    _check(k_cache.dim() == 4, op, f"caches must be (B, Hkv, capacity, D), got {tuple(k_cache.shape)}")
    hidden, D, Hkv = x.shape[2], k_cache.shape[3], k_cache.shape[1]
    qn = weights[0].shape[0] if weights[0].dim() == 2 else -1
    inter = weights[4].shape[0] if weights[4].dim() == 2 else -1
    shapes = ((qn, hidden), (Hkv * D, hidden), (Hkv * D, hidden), (hidden, qn), (inter, hidden), (inter, hidden))
    for name, w, b, shape in zip(_LAYER_WEIGHTS, weights, biases, shapes):
        _check(w.dtype == x.dtype and tuple(w.shape) == shape and w.is_contiguous() and w.layout == _STRIDED, op,
               f"{name} must be a contiguous {x.dtype} {shape} tensor, got {w.dtype} {tuple(w.shape)}")
        _check(b is None or (b.dtype == x.dtype and tuple(b.shape) == shape[:1] and b.is_contiguous()), op,
               f"the bias of {name} must be a contiguous {x.dtype} ({shape[0]},) tensor")
    for name, w in (("ln1", ln1), ("ln2", ln2)):
        _check(w.dtype == x.dtype and tuple(w.shape) == (hidden,) and w.is_contiguous(), op,
               f"{name} must be a contiguous {x.dtype} ({hidden},) tensor, got {w.dtype} {tuple(w.shape)}")
    _check(qn % D == 0 and qn // D % Hkv == 0, op, f"wq's {qn} outputs are not a multiple of {Hkv} heads of {D}")
    q = x.new_empty(x.shape[0], 1, qn // D, D)
    kv = x.new_empty(x.shape[0], 1, Hkv, D)
    _rope_attn_checks(q, kv, kv, cos, sin, k_cache, v_cache, pos, length, mask)


def _layer_fits(x, ln1, ln2, weights, biases, cos, sin, k_cache, v_cache, pos, length, mask) -> bool:
    """`_layer_checks` as an expression that raises nothing and allocates nothing."""
    dtype, xs = x.dtype, x.shape
    if not (len(xs) == 3 and xs[1] == 1 and x.is_contiguous() and dtype in _FLOATS and x.layout is _STRIDED
            and k_cache.dim() == 4 and all(w.dim() == 2 for w in weights)):
        return False
    B, hidden, Hkv, D = xs[0], xs[2], k_cache.shape[1], k_cache.shape[3]
    qn, inter, kn = weights[0].shape[0], weights[4].shape[0], Hkv * D
    if not (qn % D == 0 and (qn // D) % Hkv == 0 and D % 2 == 0 and D <= ATTENTION_MAX_HEAD_DIM):
        return False
    shapes = ((qn, hidden), (kn, hidden), (kn, hidden), (hidden, qn), (inter, hidden), (inter, hidden))
    for w, b, shape in zip(weights, biases, shapes):
        if not (w.dtype is dtype and w.shape == shape and w.is_contiguous() and w.layout is _STRIDED
                and (b is None or (b.dtype is dtype and b.shape == shape[:1] and b.is_contiguous()
                                   and b.layout is _STRIDED))):
            return False
    cs, kcs = cos.shape, k_cache.shape
    return (ln1.dtype is dtype and ln2.dtype is dtype and ln1.shape == (hidden,) and ln2.shape == (hidden,)
            and ln1.is_contiguous() and ln2.is_contiguous() and ln1.layout is _STRIDED and ln2.layout is _STRIDED
            and cos.dtype is dtype and sin.dtype is dtype and len(cs) == 4 and sin.shape == cs and cs[0] in (1, B)
            and cs[1] == 1 and cs[2] == 1 and cs[3] == D and cos.stride() == sin.stride() and cos.stride(3) == 1
            and cos.layout is _STRIDED and sin.layout is _STRIDED
            and k_cache.dtype is dtype and v_cache.dtype is dtype and v_cache.shape == kcs and kcs[0] == B
            and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and k_cache.stride(2) == D
            and k_cache.layout is _STRIDED and v_cache.layout is _STRIDED and 0 <= pos < length <= kcs[2]
            and (mask is None or (mask.dtype is torch.bool and mask.layout is _STRIDED and mask.dim() == 4
                                  and mask.shape[0] in (1, B) and mask.shape[1] == 1 and mask.shape[2] == 1
                                  and mask.shape[3] == length and mask.stride(3) == 1)))


def _layer_cpu(x, ln1, ln2, eps, wq, wk, wv, wo, wg, wu, bq, bk, bv, bo, bg, bu, cos, sin, k_cache, v_cache, pos,
               length, mask, scale):
    weights, biases = (wq, wk, wv, wo, wg, wu), (bq, bk, bv, bo, bg, bu)
    if not _layer_fits(x, ln1, ln2, weights, biases, cos, sin, k_cache, v_cache, pos, length, mask):
        _layer_checks(x, ln1, ln2, weights, biases, cos, sin, k_cache, v_cache, pos, length, mask)
    B, _, hidden = x.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    lib = build.library()
    if lib is None:  # the operators this one chains, each on its torch path
        h = _norm_cpu(x, ln1, eps)
        q, k, v = (_dense_cpu(h, w, b).view(B, 1, -1, D) for w, b in zip(weights[:3], biases[:3]))
        x_out = x + _dense_cpu(_rope_attn_cpu(q, k, v, cos, sin, k_cache, v_cache, pos, length, mask, scale), wo, bo)
        h = _norm_cpu(x_out, ln2, eps)
        return x_out, _dense_cpu(h, wg, bg), _dense_cpu(h, wu, bu)
    x_out = torch.empty_like(x)
    g = torch.empty(B, 1, wg.shape[0], dtype=x.dtype)
    u = torch.empty(B, 1, wg.shape[0], dtype=x.dtype)
    ptr = [None if t is None else t.data_ptr() for t in (*weights, *biases)]
    if lib.loom_decode_layer_attention(
            x.data_ptr(), x_out.data_ptr(), g.data_ptr(), u.data_ptr(), x.dtype is torch.bfloat16, B, hidden,
            wq.shape[0] // D, Hkv, D, wg.shape[0], ln1.data_ptr(), ln2.data_ptr(), eps, *ptr, cos.data_ptr(),
            sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0, k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.stride(0), k_cache.stride(1), pos, None if mask is None else mask.data_ptr(),
            0 if mask is None or mask.shape[0] == 1 else mask.stride(0), length, scale, pool_threads()):
        raise MemoryError("loom::decode_layer_attention: could not allocate its scratch memory")
    return x_out, g, u


def _layer_fake(x, ln1, ln2, eps, wq, wk, wv, wo, wg, wu, bq, bk, bv, bo, bg, bu, cos, sin, k_cache, v_cache, pos,
                length, mask, scale):
    _layer_checks(x, ln1, ln2, (wq, wk, wv, wo, wg, wu), (bq, bk, bv, bo, bg, bu), cos, sin, k_cache, v_cache, pos,
                  length, mask)
    return torch.empty_like(x), x.new_empty(x.shape[0], 1, wg.shape[0]), x.new_empty(x.shape[0], 1, wg.shape[0])


decode_layer_attention = _define(
    "decode_layer_attention(Tensor x, Tensor ln1, Tensor ln2, float eps, Tensor wq, Tensor wk, Tensor wv, Tensor wo, "
    "Tensor wg, Tensor wu, Tensor? bq, Tensor? bk, Tensor? bv, Tensor? bo, Tensor? bg, Tensor? bu, Tensor cos, "
    "Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int length, Tensor? mask, float scale) "
    "-> (Tensor, Tensor, Tensor)", _layer_cpu, _layer_fake)


# -- mixture of experts: a decode step's routed expert products, slots grouped by expert ---------------------------
def _moe_checks(op, x, w, chosen, rows_name="x", rows=None) -> None:
    _check_strided(op, **{rows_name: x}, w=w, chosen=chosen)
    _check_float(op, rows_name, x)
    _check(w.dtype == x.dtype, op, f"w has dtype {w.dtype} but {rows_name} has {x.dtype}; they must match")
    _check(chosen.dtype is torch.int64 and chosen.dim() == 2, op,
           f"chosen must be int64 (tokens, k), got {chosen.dtype} {tuple(chosen.shape)}")
    _check(x.dim() == 2 and w.dim() == 3 and x.shape[1] == w.shape[2], op,
           f"expects {rows_name} (rows, K) and w (experts, N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    want = chosen.shape[0] if rows is None else rows
    _check(x.shape[0] == want, op, f"{rows_name} has {x.shape[0]} rows, expected {want}")


def _moe_order(chosen):
    """Slots (token t's j-th choice is t * k + j) grouped by expert, stably: the kernels' order."""
    return chosen.reshape(-1).argsort(stable=True)


def _moe_groups(op: str, chosen, experts: int):
    """Without the C library: (expert, its positions in the kernels' slot order, that order) for each expert used,
    after checking the indices as the kernels do."""
    _check(chosen.numel() == 0 or 0 <= int(chosen.min()) and int(chosen.max()) < experts, op,
           f"chosen holds an expert index outside 0..{experts - 1}")
    order = _moe_order(chosen)
    by_slot = chosen.reshape(-1)[order]
    for e in by_slot.unique().tolist():
        yield e, (by_slot == e).nonzero().reshape(-1), order


def _moe_gate_up_cpu(x, w, chosen):
    if not (x.dtype in _FLOATS and w.dtype is x.dtype and chosen.dtype is torch.int64 and x.dim() == 2
            and w.dim() == 3 and chosen.dim() == 2 and x.shape[1] == w.shape[2] and x.shape[0] == chosen.shape[0]
            and x.layout is _STRIDED and w.layout is _STRIDED and chosen.layout is _STRIDED):
        _moe_checks("moe_gate_up", x, w, chosen)
    T, k = chosen.shape
    E, N, K = w.shape
    lib = build.library()
    if lib is None:
        y = x.new_empty(T * k, N)
        for e, at, order in _moe_groups("moe_gate_up", chosen, E):
            y[at] = _dense_cpu(x[order[at] // k], w[e], None)
        return y
    x, w, chosen = x.contiguous(), w.contiguous(), chosen.contiguous()
    y = torch.empty(T * k, N, dtype=x.dtype)
    status = lib.loom_moe_gate_up(x.data_ptr(), w.data_ptr(), chosen.data_ptr(), y.data_ptr(),
                                  x.dtype is torch.bfloat16, T, k, E, N, K, pool_threads())
    _check(status != -2, "moe_gate_up", f"chosen holds an expert index outside 0..{E - 1}")
    if status:
        raise MemoryError("loom::moe_gate_up: could not allocate its scratch memory")
    return y


def _moe_gate_up_fake(x, w, chosen):
    _moe_checks("moe_gate_up", x, w, chosen)
    return x.new_empty(chosen.numel(), w.shape[1])


moe_gate_up = _define("moe_gate_up(Tensor x, Tensor w, Tensor chosen) -> Tensor", _moe_gate_up_cpu,
                      _moe_gate_up_fake)


def _moe_down_fits(h, w, chosen, weights) -> bool:
    return (h.dtype in _FLOATS and w.dtype is h.dtype and chosen.dtype is torch.int64 and h.dim() == 2
            and w.dim() == 3 and chosen.dim() == 2 and h.shape[1] == w.shape[2] and h.shape[0] == chosen.numel()
            and weights.dtype in _FLOATS and weights.shape == chosen.shape and h.layout is _STRIDED
            and w.layout is _STRIDED and chosen.layout is _STRIDED and weights.layout is _STRIDED)


def _moe_down_checks(h, w, chosen, weights) -> None:
    _moe_checks("moe_down", h, w, chosen, "h", chosen.numel() if chosen.dim() == 2 else None)
    _check_strided("moe_down", weights=weights)
    _check_float("moe_down", "weights", weights)
    _check(weights.shape == chosen.shape, "moe_down",
           f"weights has shape {tuple(weights.shape)}, expected chosen's {tuple(chosen.shape)}")


def _moe_down_cpu(h, w, chosen, weights):
    if not _moe_down_fits(h, w, chosen, weights):
        _moe_down_checks(h, w, chosen, weights)
    T, k = chosen.shape
    E, N, K = w.shape
    lib = build.library()
    if lib is None:
        out = h.new_zeros(T, N)
        for e, at, order in _moe_groups("moe_down", chosen, E):
            slots = order[at]
            part = _dense_cpu(h[at], w[e], None) * weights.reshape(-1)[slots, None]
            out.index_add_(0, slots // k, part.to(h.dtype))
        return out
    h, w, chosen, weights = h.contiguous(), w.contiguous(), chosen.contiguous(), weights.contiguous()
    out = torch.empty(T, N, dtype=h.dtype)
    status = lib.loom_moe_down(h.data_ptr(), w.data_ptr(), chosen.data_ptr(), weights.data_ptr(),
                               weights.dtype is torch.bfloat16, out.data_ptr(), h.dtype is torch.bfloat16, T, k, E,
                               N, K, pool_threads())
    _check(status != -2, "moe_down", f"chosen holds an expert index outside 0..{E - 1}")
    if status:
        raise MemoryError("loom::moe_down: could not allocate its scratch memory")
    return out


def _moe_down_fake(h, w, chosen, weights):
    _moe_down_checks(h, w, chosen, weights)
    return h.new_empty(chosen.shape[0], w.shape[1])


moe_down = _define("moe_down(Tensor h, Tensor w, Tensor chosen, Tensor weights) -> Tensor", _moe_down_cpu,
                   _moe_down_fake)


# -- greedy pick: each row's argmax over the vocabulary -------------------------------------------------------------
def _argmax_cpu(x):
    if not (x.dtype is _F32 and x.dim() == 2 and x.shape[1] > 0 and x.layout is _STRIDED and x.is_contiguous()):
        _check(x.dtype is _F32 and x.layout is _STRIDED, "argmax_rows", f"expects dense float32, got {x.dtype}")
        _check(x.dim() == 2 and x.shape[1] > 0, "argmax_rows", f"expects (rows, n > 0), got {tuple(x.shape)}")
        x = x.contiguous()
    lib = build.library()
    if lib is None:
        return x.argmax(-1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.loom_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def _argmax_fake(x):
    _check(x.dim() == 2, "argmax_rows", f"expects (rows, n > 0), got {tuple(x.shape)}")
    return x.new_empty(x.shape[0], dtype=torch.long)


argmax_rows = _define("argmax_rows(Tensor x) -> Tensor", _argmax_cpu, _argmax_fake)


# -- int8 weight-only linear: x (..., K) @ (int8 weight (N, K) * scale (N,)).T ------------------------------------
def _int8_checks(x, weight, scale) -> None:
    op = "int8_linear"
    _check_strided(op, x=x, weight=weight, scale=scale)
    _check(x.is_floating_point(), op, f"x must be floating point, got {x.dtype}")
    _check(weight.dtype == torch.int8 and weight.dim() == 2, op,
           f"weight must be int8 (N, K), got {weight.dtype} {tuple(weight.shape)}")
    _check(scale.dtype == torch.float32 and tuple(scale.shape) == (weight.shape[0],), op,
           f"scale must be float32 ({weight.shape[0]},), got {scale.dtype} {tuple(scale.shape)}")
    _check(x.dim() >= 1 and x.shape[-1] == weight.shape[1], op,
           f"x has {x.shape[-1] if x.dim() else 0} features but weight {tuple(weight.shape)} expects {weight.shape[1]}")


def int8_dequantize(weight, scale, dtype=torch.float32):
    return weight.to(dtype) * scale.to(dtype)[:, None]


def _int8_cpu(x, weight, scale):
    if not (x.is_floating_point() and weight.dtype == torch.int8 and weight.dim() == 2 and scale.dtype == _F32
            and scale.dim() == 1 and scale.shape[0] == weight.shape[0] and x.dim() >= 1
            and x.shape[-1] == weight.shape[1] and x.layout == _STRIDED and weight.layout == _STRIDED
            and scale.layout == _STRIDED):
        _int8_checks(x, weight, scale)
    lib = build.library()
    if lib is None:
        return F.linear(x, int8_dequantize(weight, scale, x.dtype))
    w, s = weight.contiguous(), scale.contiguous()
    m, n, k = math.prod(x.shape[:-1]), w.shape[0], w.shape[1]  # m from the shape: x.reshape(-1, 0) is ambiguous
    xf = x.reshape(m, k).to(_F32).contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=_F32)
    if m:
        if lib.loom_int8_gemm(xf.data_ptr(), w.data_ptr(), s.data_ptr(), y.data_ptr(), m, n, k, pool_threads()):
            raise MemoryError(f"loom::int8_linear: could not allocate {m}x{k} int16 activation scratch")
    return y if x.dtype == _F32 else y.to(x.dtype)


def _int8_fake(x, weight, scale):
    _int8_checks(x, weight, scale)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _quant_setup(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor) or t is None))  # not group_size


def _int8_backward(ctx, grad):
    x, weight, scale = ctx.saved_tensors
    gx = gs = None
    if ctx.needs_input_grad[0]:
        gx = (grad.float() @ int8_dequantize(weight, scale)).to(x.dtype)
    if ctx.needs_input_grad[2]:  # y[., n] = scale[n] * (x . w[n]): d/dscale[n] = sum over rows of grad * x . w[n]
        xw = x.reshape(-1, x.shape[-1]).float() @ weight.float().t()
        gs = (grad.reshape(-1, grad.shape[-1]).float() * xw).sum(0)
    return gx, None, gs


int8_linear = _define("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor", _int8_cpu, _int8_fake,
                      _int8_backward, _quant_setup, grad_args=(0, 2))


# -- group-wise int8 weight-only linear: x (..., K) @ (int8 weight (N, K) * scale (N, K/G) per group).T ----------
def _int8_group_param_checks(op, weight, scale, group_size) -> None:
    _check_strided(op, weight=weight, scale=scale)
    _check(weight.dtype == torch.int8 and weight.dim() == 2, op,
           f"weight must be int8 (N, K), got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    _check(16 <= group_size <= INT8_GROUP_MAX and group_size % 16 == 0, op,
           f"group_size={group_size} must be a multiple of 16 between 16 and {INT8_GROUP_MAX}")
    _check(k % group_size == 0, op, f"group_size={group_size} must divide K={k} (the input features)")
    _check(scale.dtype in _SCALES and tuple(scale.shape) == (n, k // group_size), op,
           f"scale must be float16 or float32 ({n}, {k // group_size}), got {scale.dtype} {tuple(scale.shape)}")


def _int8_group_checks(x, weight, scale, group_size) -> None:
    _int8_group_param_checks("int8_group_linear", weight, scale, group_size)
    _check_strided("int8_group_linear", x=x)
    _check(x.is_floating_point(), "int8_group_linear", f"x must be floating point, got {x.dtype}")
    _check(x.dim() >= 1 and x.shape[-1] == weight.shape[1], "int8_group_linear",
           f"x has {x.shape[-1] if x.dim() else 0} features but weight {tuple(weight.shape)} expects {weight.shape[1]}")


def int8_group_dequantize(weight, scale, dtype=torch.float32):
    """w * scale per group of K / scale.shape[1] inputs, in float32 (exact for float16 scales), then `dtype`."""
    n, groups = scale.shape
    w = weight.float().view(n, groups, -1) * scale.float()[:, :, None]
    return w.view(n, -1).to(dtype)


_LANE_SUMS = 1 << 23  # float64 lane sums the reference holds at a time (64 MB)


def int8_group_reference(x, weight, scale, group_size):
    """loom::int8_group_linear in torch ops with the C kernel's arithmetic (csrc/int8g.c's header), so the result
    is bit-identical: activation rows rounded to int16 as quantize_row does; per group, 8 lane sums (lane l: the
    columns 16s + 2l and 16s + 2l + 1) computed exactly (float64 products of integers, sums below 2^53), rounded to
    float32, times the group scale, added to float32 lane totals group by group; the lanes summed in the kernel's
    order, times the row scale. Rows holding inf/NaN take x itself the same way, without a row scale. Memory: the
    float64 lane sums of as many groups as fit in 64 MB (at least one group's (8, M, N)) at a time."""
    n, k = weight.shape
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).float()
    m, groups = xf.shape[0], k // group_size
    if m == 0 or n == 0 or groups == 0:
        return xf.new_zeros(*lead, n).to(x.dtype)
    finite = torch.isfinite(xf).all(1)
    amax = torch.where(finite[:, None], xf, 0).abs().amax(1)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, 0)
    xs = amax / 32767.0
    xq = torch.round(xf * inv[:, None])
    xd = torch.where(finite[:, None], xq, xf).double()
    steps = group_size // 16
    # (groups * 8 lanes, M, 2 * steps): lane l of group b holds columns b*G + 16s + 2l + e
    xl = xd.view(m, groups, steps, 8, 2).permute(1, 3, 0, 2, 4).reshape(groups * 8, m, 2 * steps)
    wl = weight.double().view(n, groups, steps, 8, 2).permute(1, 3, 2, 4, 0).reshape(groups * 8, 2 * steps, n)
    sf = scale.float().t()  # (groups, N)
    lanes = torch.zeros(8, m, n)
    chunk = max(1, _LANE_SUMS // (8 * m * n))
    for g0 in range(0, groups, chunk):
        g1 = min(g0 + chunk, groups)
        sums = torch.bmm(xl[8 * g0:8 * g1], wl[8 * g0:8 * g1]).float().view(g1 - g0, 8, m, n)
        for b in range(g1 - g0):
            lanes += sums[b] * sf[g0 + b, None, :]
    v = lanes[:4] + lanes[4:]
    total = (v[0] + v[2]) + (v[1] + v[3])
    y = torch.where(finite[:, None], total * xs[:, None], total)
    return y.view(*lead, n).to(x.dtype)


def _int8_group_cpu(x, weight, scale, group_size):
    if not (x.is_floating_point() and weight.dtype == torch.int8 and weight.dim() == 2 and scale.dtype in _SCALES
            and 16 <= group_size <= INT8_GROUP_MAX and group_size % 16 == 0 and x.dim() >= 1
            and x.shape[-1] == weight.shape[1] and x.shape[-1] % group_size == 0
            and tuple(scale.shape) == (weight.shape[0], x.shape[-1] // group_size)
            and x.layout == _STRIDED and weight.layout == _STRIDED and scale.layout == _STRIDED):
        _int8_group_checks(x, weight, scale, group_size)
    lib = build.library()
    if lib is None:
        return int8_group_reference(x, weight, scale, group_size)
    w, s = weight.contiguous(), scale.contiguous()
    m, n, k = math.prod(x.shape[:-1]), w.shape[0], w.shape[1]
    # the kernel reads rows of K floats: a contiguous float32 x is that already (a decode step's usual input)
    xf = x if x.dtype is _F32 and x.is_contiguous() else x.reshape(m, k).to(_F32).contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=_F32)
    if m and lib.loom_int8_group_gemm(xf.data_ptr(), w.data_ptr(), s.data_ptr(), s.dtype == torch.float16,
                                      y.data_ptr(), m, n, k, group_size, pool_threads()):
        raise MemoryError(f"loom::int8_group_linear: could not allocate {m}x{k} int16 activation scratch")
    return y if x.dtype == _F32 else y.to(x.dtype)


def _int8_group_fake(x, weight, scale, group_size):
    _int8_group_checks(x, weight, scale, group_size)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _int8_group_backward(ctx, grad):
    x, weight, scale = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise NotImplementedError("loom::int8_group_linear has no gradient for scale; keep it a frozen buffer")
    gx = None
    if ctx.needs_input_grad[0]:
        gx = (grad.float() @ int8_group_dequantize(weight, scale)).to(x.dtype)
    return gx, None, None, None


int8_group_linear = _define("int8_group_linear(Tensor x, Tensor weight, Tensor scale, int group_size) -> Tensor",
                            _int8_group_cpu, _int8_group_fake, _int8_group_backward, _quant_setup,
                            grad_args=(0, 2))


# -- int4 group-wise weight-only linear ---------------------------------------------------------------------------
def _int4_param_checks(op, packed, scale, zero, group_size) -> None:
    _check_strided(op, packed=packed, scale=scale, zero=zero)
    _check(packed.dtype == torch.uint8 and packed.dim() == 2, op,
           f"packed must be uint8 (N, K/2), got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    _check(group_size > 0 and k % group_size == 0, op,
           f"group_size={group_size} must divide K={k} (the unpacked input features)")
    _check(group_size % 16 == 0, op, f"group_size={group_size} must be a multiple of 16")
    _check(scale.dtype in (torch.float16, torch.float32) and tuple(scale.shape) == (n, k // group_size), op,
           f"scale must be float16 or float32 ({n}, {k // group_size}), got {scale.dtype} {tuple(scale.shape)}")
    if zero is not None:
        _check(zero.dtype == scale.dtype and zero.shape == scale.shape, op,
               f"zero must match scale ({scale.dtype} {tuple(scale.shape)}), got {zero.dtype} {tuple(zero.shape)}")


def _int4_checks(x, packed, scale, zero, group_size) -> None:
    _int4_param_checks("int4_linear", packed, scale, zero, group_size)
    _check_strided("int4_linear", x=x)
    _check(x.is_floating_point(), "int4_linear", f"x must be floating point, got {x.dtype}")
    _check(x.dim() >= 1 and x.shape[-1] == packed.shape[1] * 2, "int4_linear",
           f"x has {x.shape[-1] if x.dim() else 0} features but the packed weight expects {packed.shape[1] * 2}")


def unpack_int4(packed):
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15], the even column from the low nibble."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def int4_dequantize_reference(packed, scale, zero):
    """w = (nibble - zero) * scale per group in float32 (the group size follows from the shapes); zero None is the
    symmetric layout (zero 8)."""
    u = unpack_int4(packed).to(torch.float32)
    n, groups = scale.shape
    z = 8.0 if zero is None else zero.float()[:, :, None]
    return ((u.view(n, groups, -1) - z) * scale.float()[:, :, None]).view(n, -1)


def _int4_cpu(x, packed, scale, zero, group_size, tiles=None):
    """`tiles` (a module's copy in int4_a8_tiles' layout): decode sizes take csrc/int4a8.c's int16 kernel on them,
    with the same int16 rounding and bound as the saved layout's kernel and about twice as fast on weights streamed
    from memory; more rows keep the saved layout's blocked GEMM."""
    if not (x.is_floating_point() and packed.dtype == torch.uint8 and packed.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == packed.shape[1] * 2 and group_size > 0 and group_size % 16 == 0
            and x.shape[-1] % group_size == 0 and scale.dtype in _SCALES and scale.dim() == 2
            and scale.shape[0] == packed.shape[0] and scale.shape[1] * group_size == x.shape[-1]
            and (zero is None or (zero.dtype == scale.dtype and zero.shape == scale.shape
                                  and zero.layout == _STRIDED))
            and x.layout == _STRIDED and packed.layout == _STRIDED and scale.layout == _STRIDED):
        _int4_checks(x, packed, scale, zero, group_size)
    if tiles is not None and not (group_size % _A8_BLOCK == 0 and tiles.dtype == torch.uint8 and tiles.dim() == 1
                                  and tiles.layout == _STRIDED
                                  and tiles.numel() == _a8_tile_bytes(packed.shape[0], x.shape[-1], scale, zero)):
        _int4_tiles_checks(x, packed, scale, zero, group_size, tiles)
    lib = build.library()
    if lib is None:
        return F.linear(x, int4_dequantize_reference(packed, scale, zero).to(x.dtype))
    xf = x.reshape(-1, x.shape[-1]).to(_F32).contiguous()
    w, s = packed.contiguous(), scale.contiguous()
    z = None if zero is None else zero.contiguous()
    m, n, k = xf.shape[0], w.shape[0], xf.shape[1]
    y = torch.empty((*x.shape[:-1], n), dtype=_F32)
    args = (w.data_ptr(), s.data_ptr(), None if z is None else z.data_ptr(), s.dtype == torch.float16, y.data_ptr(),
            m, n, k, group_size, pool_threads())
    if m and (lib.loom_int4_tiles_gemm(xf.data_ptr(), tiles.contiguous().data_ptr(), *args)
              if tiles is not None and m <= MAX_ROWS else lib.loom_int4_gemm(xf.data_ptr(), *args)):
        raise MemoryError(f"loom::int4_linear: could not allocate {m}x{k} activation scratch")
    return y if x.dtype == _F32 else y.to(x.dtype)


def _int4_fake(x, packed, scale, zero, group_size, tiles=None):
    _int4_checks(x, packed, scale, zero, group_size)
    if tiles is not None:
        _int4_tiles_checks(x, packed, scale, zero, group_size, tiles)
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _int4_backward(ctx, grad):
    x, packed, scale, zero = ctx.saved_tensors
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError("loom::int4_linear has no gradient for scale or zero; keep them frozen buffers")
    w = int4_dequantize_reference(packed, scale, zero)
    gx = (grad.float() @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
    return gx, None, None, None, None, None


def _int4_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])  # not the tiles (a module's cache, maybe made under inference_mode)


def _int4_tiles_checks(x, packed, scale, zero, group_size, tiles) -> None:
    op = "int4_linear"
    _check(group_size % _A8_BLOCK == 0, op,
           f"tiles need group_size={group_size} to be a multiple of 32 (the tiles hold blocks of 32 inputs)")
    _check_strided(op, tiles=tiles)
    _tiles_layout_check(op, packed, scale, zero, tiles)


def _tiles_layout_check(op, packed, scale, zero, tiles) -> None:
    want = _a8_tile_bytes(packed.shape[0], packed.shape[1] * 2, scale, zero)
    _check(tiles.dtype == torch.uint8 and tiles.dim() == 1 and tiles.numel() == want, op,
           f"tiles must be the uint8 ({want},) layout int4_a8_tiles makes of these weights, got "
           f"{tiles.dtype} {tuple(tiles.shape)}")


def int4_tiles_int16() -> bool:
    """Whether the kernel level in use has the int16 kernel on tiles (every level today: AVX-512 and AVX2 variants);
    a level without it would answer False, and tiles would be memory spent for nothing."""
    return build.has("loom_int4_tiles_int16")


int4_linear = _define(
    "int4_linear(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int group_size, Tensor? tiles=None) -> Tensor",
    _int4_cpu, _int4_fake, _int4_backward, _int4_setup, grad_args=(0, 2, 3))


# -- int4 weights x 8-bit activations (opt-in decode kernel, csrc/int4a8.c) ----------------------------------------
_A8_BLOCK = 32
_A8_ROWS = 16  # weight rows per tile of the kernel's layout
_A8_TINY = 1e-30  # csrc/int4a8.c A8_TINY: a block with a smaller max|x| counts as zero


def _a8_tile_bytes(n, k, scale, zero) -> int:
    ssz = 2 if scale.dtype == torch.float16 else 4
    return -(-n // _A8_ROWS) * (k // _A8_BLOCK) * (256 + _A8_ROWS * ssz * (1 if zero is None else 2))


def int4_a8_tile_bytes(packed, scale, zero) -> int:
    """The size of int4_a8_tiles' layout for these weights."""
    return _a8_tile_bytes(packed.shape[0], packed.shape[1] * 2, scale, zero)


def _int4_a8_checks(x, packed, scale, zero, group_size, tiles) -> None:
    op = "int4_linear_a8"
    _check(group_size % _A8_BLOCK == 0, op,
           f"group_size={group_size} must be a multiple of 32 (8-bit activations are scaled per block of 32)")
    _int4_param_checks(op, packed, scale, zero, group_size)
    _check_strided(op, x=x, tiles=tiles)
    _check(x.is_floating_point(), op, f"x must be floating point, got {x.dtype}")
    _check(x.dim() >= 1 and x.shape[-1] == packed.shape[1] * 2, op,
           f"x has {x.shape[-1] if x.dim() else 0} features but the packed weight expects {packed.shape[1] * 2}")
    if tiles is not None:
        _tiles_layout_check(op, packed, scale, zero, tiles)


def int4_a8_tiles(packed, scale, zero, group_size):
    """The saved int4 layout (packed (N, K/2), scale and zero (N, K/G)) -> the uint8 stream csrc/int4a8.c reads
    (its header): per tile of 16 rows and block of 32 columns, 256 bytes of nibbles (vector j, lane r = bytes
    4j..4j+3 of row r's block), then the 16 rows' scales and zeros in their stored dtype (repeated per block where
    a group spans several). Rows past N are zero."""
    _check(group_size > 0 and group_size % _A8_BLOCK == 0, "int4_a8_tiles",
           f"group_size={group_size} must be a multiple of 32 (8-bit activations are scaled per block of 32)")
    n, k = packed.shape[0], packed.shape[1] * 2
    nb, tiles = k // _A8_BLOCK, -(-n // _A8_ROWS)
    if tiles == 0 or nb == 0:
        return packed.new_zeros(0)
    pad = tiles * _A8_ROWS - n
    w = F.pad(packed, (0, 0, 0, pad)).view(tiles, _A8_ROWS, nb, 4, 4).permute(0, 2, 3, 1, 4)  # (T, nb, j, r, e)
    parts = [w.reshape(tiles, nb, 256)]
    for p in (scale,) if zero is None else (scale, zero):
        e = F.pad(p.repeat_interleave(group_size // _A8_BLOCK, dim=1), (0, 0, 0, pad))  # (T * 16, nb)
        e = e.view(tiles, _A8_ROWS, nb).transpose(1, 2).contiguous()  # (T, nb, 16)
        parts.append(e.view(torch.uint8).view(tiles, nb, -1))
    return torch.cat(parts, dim=2).reshape(-1)


def int4_a8_quantize_activations(xf):
    """float32 rows (M, K) -> (q (M, K/32, 32) float32 integers in [-127, 127], d (M, K/32) float32 block scales)
    as csrc/int4a8.c rounds them: d = amax / 127 and q = round_half_even(x * (127 / amax)) per block of 32, blocks
    with amax < 1e-30 zero."""
    m, k = xf.shape
    xb = xf.view(m, k // _A8_BLOCK, _A8_BLOCK)
    amax = xb.abs().amax(2)
    live = amax >= _A8_TINY
    safe = torch.where(live, amax, 1.0)
    c127 = torch.full_like(safe, 127.0)  # tensor / tensor: `127.0 / t` would multiply by t's reciprocal
    inv = torch.where(live, torch.div(c127, safe), 0.0)  # float32 division, as the C code's 127.0f / amax
    d = torch.where(live, torch.div(safe, c127), 0.0)
    return torch.round(xb * inv[:, :, None]), d


def int4_a8_reference(x, packed, scale, zero, group_size):
    """loom::int4_linear_a8 in torch ops with csrc/int4a8.c's arithmetic (its header), so the result is
    bit-identical: int8 activations per block of 32, exact integer block products (float32 products of integers
    whose sums stay below 2^24), v = ((isum - zero * qsum) * scale) * d per block in float32, added block by block
    from +0. Rows holding inf/NaN take a float product with the dequantized weight (their results are inf/NaN
    whatever the order). Memory: the block products of as many blocks as fit in 64 MB at a time."""
    n, k = packed.shape[0], packed.shape[1] * 2
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).float()
    m, nb = xf.shape[0], k // _A8_BLOCK
    if m == 0 or n == 0 or nb == 0:
        return xf.new_zeros(*lead, n).to(x.dtype)
    finite = torch.isfinite(xf).all(1)
    q, d = int4_a8_quantize_activations(torch.where(finite[:, None], xf, 0.0))
    qsum = q.sum(2)  # exact: at most 32 * 127
    u = unpack_int4(packed).float().view(n, nb, _A8_BLOCK)
    per = group_size // _A8_BLOCK
    s = scale.float().repeat_interleave(per, dim=1).t()  # (blocks, N)
    z = torch.full_like(s, 8.0) if zero is None else zero.float().repeat_interleave(per, dim=1).t()
    qt, ut, qst, dt = q.transpose(0, 1), u.permute(1, 2, 0), qsum.t(), d.t()
    y = torch.zeros(m, n)
    chunk = max(1, _LANE_SUMS // (m * n))
    for b0 in range(0, nb, chunk):
        b1 = min(b0 + chunk, nb)
        isum = torch.bmm(qt[b0:b1], ut[b0:b1])  # (blocks, M, N), exact integers
        v = isum - z[b0:b1, None, :] * qst[b0:b1, :, None]
        v = (v * s[b0:b1, None, :]) * dt[b0:b1, :, None]
        for b in range(b1 - b0):
            y += v[b]
    if not bool(finite.all()):
        bad = ~finite
        y[bad] = F.linear(xf[bad], int4_dequantize_reference(packed, scale, zero))
    return y.view(*lead, n).to(x.dtype)


def _int4_a8_cpu(x, packed, scale, zero, group_size, tiles=None):
    if not (x.is_floating_point() and packed.dtype == torch.uint8 and packed.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == packed.shape[1] * 2 and group_size > 0 and group_size % 32 == 0
            and x.shape[-1] % group_size == 0 and scale.dtype in _SCALES and scale.dim() == 2
            and scale.shape[0] == packed.shape[0] and scale.shape[1] * group_size == x.shape[-1]
            and (zero is None or (zero.dtype == scale.dtype and zero.shape == scale.shape
                                  and zero.layout == _STRIDED))
            and x.layout == _STRIDED and packed.layout == _STRIDED and scale.layout == _STRIDED
            and (tiles is None or (tiles.dtype == torch.uint8 and tiles.dim() == 1 and tiles.layout == _STRIDED
                                   and tiles.numel() == _a8_tile_bytes(packed.shape[0], x.shape[-1], scale,
                                                                       zero)))):
        _int4_a8_checks(x, packed, scale, zero, group_size, tiles)
    lib = build.library()
    if lib is None:
        return int4_a8_reference(x, packed, scale, zero, group_size)
    w, s = packed.contiguous(), scale.contiguous()
    z = None if zero is None else zero.contiguous()
    # without the layout from the caller (a module keeps one), it is made here: a pass over the weight per call
    t = int4_a8_tiles(w, s, z, group_size) if tiles is None else tiles.contiguous()
    m, n, k = math.prod(x.shape[:-1]), w.shape[0], w.shape[1] * 2
    xf = x if x.dtype is _F32 and x.is_contiguous() else x.reshape(m, k).to(_F32).contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=_F32)
    if m and lib.loom_int4_a8_gemm(xf.data_ptr(), t.data_ptr(), w.data_ptr(), s.data_ptr(),
                                   None if z is None else z.data_ptr(), s.dtype == torch.float16, y.data_ptr(),
                                   m, n, k, group_size, pool_threads()):
        raise MemoryError(f"loom::int4_linear_a8: could not allocate {m}x{k} int8 activation scratch")
    return y if x.dtype == _F32 else y.to(x.dtype)


def _int4_a8_fake(x, packed, scale, zero, group_size, tiles=None):
    _int4_a8_checks(x, packed, scale, zero, group_size, tiles)
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _int4_a8_backward(ctx, grad):
    x, packed, scale, zero = ctx.saved_tensors
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError("loom::int4_linear_a8 has no gradient for scale or zero; keep them frozen buffers")
    w = int4_dequantize_reference(packed, scale, zero)  # the straight-through gradient of the 8-bit rounding
    gx = (grad.float() @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
    return gx, None, None, None, None, None


def _int4_a8_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])  # not the tiles (a module's cache, maybe made under inference_mode)


int4_linear_a8 = _define(
    "int4_linear_a8(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int group_size, Tensor? tiles=None) -> Tensor",
    _int4_a8_cpu, _int4_a8_fake, _int4_a8_backward, _int4_a8_setup, grad_args=(0, 2, 3))


def _dequant_cpu(packed, scale, zero, group_size):
    _int4_param_checks("int4_dequantize", packed, scale, zero, group_size)
    lib = build.library()
    if lib is None:
        return int4_dequantize_reference(packed, scale, zero)
    w, s = packed.contiguous(), scale.contiguous()
    z = None if zero is None else zero.contiguous()
    n, k = w.shape[0], w.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.float32)
    lib.loom_int4_dequantize(w.data_ptr(), s.data_ptr(), None if z is None else z.data_ptr(),
                             int(s.dtype == torch.float16), out.data_ptr(), n, k, group_size, pool_threads())
    return out


def _dequant_fake(packed, scale, zero, group_size):
    _int4_param_checks("int4_dequantize", packed, scale, zero, group_size)
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)


int4_dequantize = _define("int4_dequantize(Tensor packed, Tensor scale, Tensor? zero, int group_size) -> Tensor",
                          _dequant_cpu, _dequant_fake)


# -- asymmetric int4 quantizer (csrc/int4_quantize.c; the torch reference below defines the results) -------------
_INT4_RANGE_SHRINKS = (1.0, 0.9, 0.8)
_INT4_CHUNK = 1 << 20  # weights per block of rows in the torch search (bounds its temporaries)
_HALF_MAX = 65504.0


def _quantize_checks(weight, group_size) -> None:
    op = "int4_quantize_asymmetric"
    _check_strided(op, weight=weight)
    _check(weight.is_floating_point() and weight.dim() == 2, op,
           f"weight must be a floating-point (N, K) tensor, got {weight.dtype} {tuple(weight.shape)}")
    k = weight.shape[1]
    _check(k % 2 == 0, op, f"K={k} must be even (two int4 values per byte)")
    _check(group_size > 0 and k % group_size == 0, op, f"group_size={group_size} must divide K={k}")


def pack_int4(u):
    """(N, K) values in [0, 15] -> (N, K/2) uint8, the even column in the low nibble."""
    u = u.to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def int4_quantize_asymmetric_reference(weight, group_size):
    """The asymmetric int4 search in torch ops (any device): (packed (N, K/2) uint8, scale, zero (N, K/G) float16).
    loom.quantization.linear.quantize_int4_asymmetric describes the search; csrc/int4_quantize.c computes the same
    bits. Raises ValueError for a group no float16 scale can hold (NaN, inf, or too wide a range)."""
    _quantize_checks(weight, group_size)
    out, inp = weight.shape
    rows = max(1, _INT4_CHUNK // max(inp, 1))
    parts = [_int4_asymmetric_rows(weight[i:i + rows].detach().float(), group_size) for i in range(0, out, rows)]
    if not parts:
        scale = weight.new_empty(0, inp // group_size, dtype=torch.float16)
        return weight.new_empty(0, inp // 2, dtype=torch.uint8), scale, torch.empty_like(scale)
    packed, scale, zero = (torch.cat(p) for p in zip(*parts))
    _check_quantized(weight, scale, group_size)
    return packed, scale, zero


def _int4_asymmetric_rows(weight, group_size):
    out, inp = weight.shape
    w = weight.reshape(out, inp // group_size, group_size)
    # the grid always holds 0 (as GPTQ's and AWQ's do): an all-positive group still gets zero point 0. A zero
    # minimum counts as +0.0 whatever the sign of the zeros in the group (amin's choice between -0.0 and +0.0
    # depends on its reduction order), so the sign of a zero point 0 is defined and the C search matches it.
    low = w.amin(dim=2, keepdim=True)
    low = torch.where(low < 0, low, 0.0)
    high = w.amax(dim=2, keepdim=True).clamp_(min=0)
    best_err = torch.full_like(low, float("inf"))
    best_scale = best_zero = torch.zeros_like(low)
    for a in _INT4_RANGE_SHRINKS:
        for b in _INT4_RANGE_SHRINKS:
            lo, hi = low * a, high * b
            minmax = ((hi - lo) / 15).clamp_(min=1e-6)
            zero = torch.round(-lo / minmax).clamp_(0, 15)
            room_above, room_below = 15 - zero, zero  # grid steps on each side of 0
            covering = torch.maximum(torch.where(room_above > 0, hi / room_above.clamp(min=1), 0),
                                     torch.where(room_below > 0, -lo / room_below.clamp(min=1), 0)).clamp_(min=1e-6)
            for scale in (minmax, covering):
                s = scale.half().float()
                err = torch.round(w / s + zero).clamp_(0, 15).sub_(zero).mul_(s).sub_(w).square_().sum(2, True)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, zero, best_zero)
    q = torch.round(w / best_scale + best_zero).clamp_(0, 15)
    return pack_int4(q.view(out, inp)), best_scale.squeeze(2).half(), best_zero.squeeze(2).half()


def _check_quantized(weight, scale, group_size) -> None:
    """A group whose every candidate had an infinite or NaN error keeps scale 0: name the first one."""
    if scale.device.type == "meta" or not (scale == 0).any():
        return
    row, group = (int(i) for i in (scale == 0).nonzero()[0])
    cols = slice(group * group_size, (group + 1) * group_size)
    values = weight[row, cols].detach().float()
    where = f"weight row {row}, columns {cols.start}-{cols.stop - 1}"
    if not values.isfinite().all():
        _check(False, "int4_quantize_asymmetric", f"{where} hold NaN or inf, which int4 cannot store; fix the "
               "weights (or keep this layer in full precision with modules_to_not_convert)")
    _check(False, "int4_quantize_asymmetric",
           f"{where} span [{values.min().item():.4g}, {values.max().item():.4g}], too wide for a float16 scale "
           f"(at most {_HALF_MAX:.0f} per step, ranges up to ~{_HALF_MAX * 15 / 0.8:.3g}); keep this layer in full "
           "precision (modules_to_not_convert) or quantize it symmetrically (float32 scales)")


def _quantize_cpu(weight, group_size):
    _quantize_checks(weight, group_size)
    lib = build.library()
    if lib is None:
        return int4_quantize_asymmetric_reference(weight, group_size)
    w = weight.detach().float().contiguous()
    n, k = w.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale = torch.empty(n, k // group_size, dtype=torch.float16)
    zero = torch.empty_like(scale)
    if n and lib.loom_int4_quantize_asymmetric(w.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                               n, k, group_size, pool_threads()):
        raise MemoryError(f"loom::int4_quantize_asymmetric: could not allocate {group_size * 32} bytes of scratch")
    _check_quantized(w, scale, group_size)
    return packed, scale, zero


def _quantize_fake(weight, group_size):
    _quantize_checks(weight, group_size)
    n, k = weight.shape
    scale = weight.new_empty(n, k // group_size, dtype=torch.float16)
    return weight.new_empty(n, k // 2, dtype=torch.uint8), scale, torch.empty_like(scale)


int4_quantize_asymmetric = _define(
    "int4_quantize_asymmetric(Tensor weight, int group_size) -> (Tensor, Tensor, Tensor)", _quantize_cpu,
    _quantize_fake)


# -- token cross entropy: -log_softmax(logits)[label] per row, straight from the logits' dtype -----------------------
def _nll_checks(logits, labels, ignore_index) -> None:
    op = "token_nll"
    _check_strided(op, logits=logits, labels=labels)
    _check_float(op, "logits", logits)
    _check(logits.dim() == 2 and labels.dim() == 1 and labels.shape[0] == logits.shape[0], op,
           f"expects logits (N, V) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    _check(not labels.is_floating_point() and not labels.is_complex() and labels.dtype is not torch.bool, op,
           f"labels must be integer class indices, got {labels.dtype}")


def _nll_bad_label(logits, labels, ignore_index) -> None:
    V = logits.shape[1]
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise IndexError(f"loom::token_nll: label {int(labels[row])} at row {row} is out of range for {V} classes "
                         f"(labels must be in [0, {V}) or ignore_index {ignore_index})")


def token_nll_reference(logits, labels, ignore_index: int):
    """The torch computation the kernel reproduces: per-row loss -((x[label] - max) - log(sum(e^(x - max)))) in
    fp32 (0 on ignored rows), and each row's (max, log-sum)."""
    x = logits.float()
    keep = labels != ignore_index
    mx = x.amax(-1, keepdim=True)
    logsum = (x - mx).exp().sum(-1, keepdim=True).log()
    picked = x.gather(1, torch.where(keep, labels, 0).unsqueeze(1))
    loss = torch.where(keep, -((picked - mx) - logsum).squeeze(1), 0.0)
    stats = torch.where(keep.unsqueeze(1), torch.cat([mx, logsum], 1), 0.0)
    return loss, stats


def _nll_cpu(logits, labels, ignore_index):
    if not (logits.dtype in _FLOATS and logits.dim() == 2 and labels.dim() == 1 and logits.layout == _STRIDED
            and labels.layout == _STRIDED and labels.shape[0] == logits.shape[0] and labels.dtype is torch.int64):
        _nll_checks(logits, labels, ignore_index)
        labels = labels.to(torch.int64)
    lib = build.library()
    if lib is None:
        _nll_bad_label(logits, labels, ignore_index)
        return token_nll_reference(logits, labels, ignore_index)
    x, labels = _unit_stride_last(logits), labels.contiguous()
    n, V = x.shape
    loss = torch.empty(n, dtype=_F32)
    stats = torch.empty(n, 2, dtype=_F32)
    if n and lib.loom_token_nll(x.data_ptr(), x.dtype is torch.bfloat16, n, V, x.stride(0) if n > 1 else V,
                                labels.data_ptr(), ignore_index, loss.data_ptr(), stats.data_ptr(), pool_threads()):
        _nll_bad_label(logits, labels, ignore_index)
    return loss, stats


def _nll_fake(logits, labels, ignore_index):
    _nll_checks(logits, labels, ignore_index)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=_F32), logits.new_empty(n, 2, dtype=_F32)


def _nll_setup(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.ignore_index = ignore_index


def _nll_backward(ctx, grad_loss, _grad_stats):
    logits, labels, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    labels = labels.to(torch.int64)
    g = grad_loss.float().contiguous()
    lib = build.library()
    if lib is None or type(logits) not in (torch.Tensor, torch.nn.Parameter) or not logits.is_cpu:
        # e^(logp) * w, plus -w at the label (as the kernel: -w + e^(logp) * w); no data-dependent shapes, so
        # that torch.compile traces it
        x = logits.float()
        keep = labels != ctx.ignore_index
        p = ((x - stats[:, :1]) - stats[:, 1:]).exp() * g.unsqueeze(1)
        p = p.scatter_add(1, torch.where(keep, labels, 0).unsqueeze(1), -g.unsqueeze(1))
        return torch.where(keep.unsqueeze(1), p, 0.0).to(logits.dtype), None, None
    x = _unit_stride_last(logits)
    n, V = x.shape
    grad = torch.empty(n, V, dtype=logits.dtype)
    if n:
        lib.loom_token_nll_backward(x.data_ptr(), x.dtype is torch.bfloat16, n, V, x.stride(0) if n > 1 else V,
                                    labels.contiguous().data_ptr(), ctx.ignore_index, stats.contiguous().data_ptr(),
                                    g.data_ptr(), grad.data_ptr(), pool_threads())
    return grad, None, None


_token_nll = _define("token_nll(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)", _nll_cpu,
                     _nll_fake, _nll_backward, _nll_setup, grad_args=(0,))


def token_nll(logits, labels, ignore_index: int = -100):
    """Per-row cross entropy -log_softmax(logits[r])[labels[r]] as fp32 (N,), 0 where labels[r] == ignore_index;
    differentiable in logits. logits (N, V) fp32 or bf16; the sum over rows divided by the kept count is
    F.cross_entropy's mean."""
    return _token_nll(logits, labels, ignore_index)[0]


# -- whole-sequence attention (training, prefill): softmax(q k^T * scale [causal]) v with its backward ---------------
FLASH_MAX_HEAD_DIM = 256


def _flash_checks(q, k, v, scale, causal, lens=None, bias=None) -> None:
    op = "flash_attention"
    _check_strided(op, q=q, k=k, v=v)
    _check_float(op, "q", q)
    _check(k.dtype == q.dtype and v.dtype == q.dtype, op,
           f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, op,
           f"expects q (B, H, T, D) and k, v (B, Hkv, S, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    _check(k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, op,
           f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, Hkv, S, D={D})")
    _check(k.shape[1] > 0 and H % k.shape[1] == 0, op, f"{H} query heads are not a multiple of {k.shape[1]} kv heads")
    _check(0 < D <= FLASH_MAX_HEAD_DIM, op, f"head dim {D} must be in 1..{FLASH_MAX_HEAD_DIM}")
    _check(k.shape[2] > 0, op, "needs at least one key (S = 0)")
    if lens is not None:
        _check(isinstance(lens, torch.Tensor) and lens.dtype is torch.int64 and lens.dim() == 1
               and lens.shape[0] == B and lens.device.type == "cpu", op,
               f"lens must be a CPU int64 tensor of the {B} batch rows' key counts, got "
               f"{getattr(lens, 'dtype', type(lens).__name__)} {tuple(getattr(lens, 'shape', ()))}")
    if bias is not None:
        T, S = q.shape[2], k.shape[2]
        _check(isinstance(bias, torch.Tensor) and bias.dtype in (_F32, q.dtype) and bias.dim() == 4
               and bias.shape[0] in (1, B) and bias.shape[1] in (1, H) and bias.shape[2] == T and bias.shape[3] == S
               and bias.device.type == "cpu", op,
               f"bias must be a CPU float32 or {q.dtype} tensor of shape (B={B} or 1, H={H} or 1, T={T}, S={S}), got "
               f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")


def _lens_mask(lens, S: int):
    """(B, 1, 1, S) bools: key j of batch row b is real where j < lens[b]"""
    return (torch.arange(S) < lens[:, None])[:, None, None, :]


def flash_attention_reference(q, k, v, scale: float, causal: bool, lens=None, bias=None):
    gqa = int(k.shape[1]) != int(q.shape[1])
    if lens is None and bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    T, S = q.shape[2], k.shape[2]
    mask = torch.ones(1, 1, 1, S, dtype=torch.bool) if lens is None else _lens_mask(lens, S)
    if causal:
        mask = mask & torch.ones(T, S, dtype=torch.bool).tril()
    attn_mask = mask if bias is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0)  # rows with no key: zeros, as the kernel gives them


def _flash_lse_reference(q, k, scale, causal, lens=None, bias=None):
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if bias is not None:
        s = s + bias.float()
    if lens is not None:
        s = s.masked_fill(~_lens_mask(lens, k.shape[2]), float("-inf"))
    return s.logsumexp(-1)


def _flash_cpu(q, k, v, scale, causal, lens=None, bias=None):
    if lens is not None or bias is not None or not (
            q.dtype in _FLOATS and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 4 and k.dim() == 4
            and k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3] and k.shape[1] > 0
            and q.shape[1] % k.shape[1] == 0 and 0 < q.shape[3] <= FLASH_MAX_HEAD_DIM and k.shape[2] > 0
            and q.layout == _STRIDED and k.layout == _STRIDED and v.layout == _STRIDED):
        _flash_checks(q, k, v, scale, causal, lens, bias)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, T, H, D, dtype=q.dtype).transpose(1, 2)  # (B, H, T, D) whose transpose(1, 2) is contiguous
    lse = torch.empty(B, H, T, dtype=_F32)
    lib = build.library()
    if lib is None:
        out.copy_(flash_attention_reference(q, k, v, scale, causal, lens, bias))
        lse.copy_(_flash_lse_reference(q, k, scale, causal, lens, bias))
        return out, lse
    if B and T and H:
        # the heads of a (B, T, H, D) projection seen as (B, H, T, D) are read where they are, not copied
        q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
        if q.dtype is torch.bfloat16 and q.stride(2) % 2 and T > 1:
            q = q.contiguous()  # the bf16 kernel reads q's rows as pairs
        strides = [q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2)]
        if bias is not None:
            if bias.stride(3) != 1:
                bias = bias.contiguous()
            strides += [bias.stride(i) if bias.shape[i] > 1 else 0 for i in range(3)]  # 0: broadcast over it
        strides = torch.tensor(strides, dtype=torch.int64)
        lens = None if lens is None else lens.contiguous()
        if lib.loom_flash_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), *out.stride()[:3],
                                    lse.data_ptr(), q.dtype is torch.bfloat16, B, H, Hkv, T, S, D, scale, causal,
                                    None if lens is None else lens.data_ptr(),
                                    None if bias is None else bias.data_ptr(),
                                    bias is not None and bias.dtype is torch.bfloat16, strides.data_ptr(),
                                    pool_threads()):
            raise MemoryError(f"loom::flash_attention: could not allocate scratch for {S} keys")
    return out, lse


def _flash_fake(q, k, v, scale, causal, lens=None, bias=None):
    _flash_checks(q, k, v, scale, causal, lens, bias)
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=_F32)


def _flash_setup(ctx, inputs, output):
    q, k, v, scale, causal, *rest = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])
    rest += [None, None]
    ctx.scale, ctx.causal, ctx.lens, ctx.bias = scale, causal, rest[0], rest[1]


def _flash_backward(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    lib = build.library()
    if lib is None or ctx.lens is not None or ctx.bias is not None or not all(
            type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_cpu for t in (q, k, v, grad)):
        # (the kernel's backward takes no key counts or bias: their gradient is SDPA's with the mask; no gradient
        # for the bias)
        with torch.enable_grad():
            qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
            o = flash_attention_reference(qr, kr, vr, ctx.scale, ctx.causal, ctx.lens, ctx.bias)
        return (*torch.autograd.grad(o, (qr, kr, vr), grad), None, None, None, None)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad = grad.to(q.dtype)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B and T and H and lib.loom_flash_attention_backward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), *out.stride()[:3], lse.contiguous().data_ptr(),
            grad.data_ptr(), *grad.stride()[:3], dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            q.dtype is torch.bfloat16, B, H, Hkv, T, S, D, ctx.scale, ctx.causal, pool_threads()):
        raise MemoryError(f"loom::flash_attention: could not allocate backward scratch for {S} keys")
    return dq, dk, dv, None, None, None, None


_flash_attention = _define("flash_attention(Tensor q, Tensor k, Tensor v, float scale, bool causal, Tensor? lens=None,"
                           " Tensor? bias=None) -> (Tensor, Tensor)",
                           _flash_cpu, _flash_fake, _flash_backward, _flash_setup, grad_args=(0, 1, 2))


def flash_attention(q, k, v, scale: float, causal: bool, lens=None, bias=None):
    """softmax(q k^T * scale [+ bias]) v over whole sequences, causal (query i sees keys 0..i) or not: q (B, H, T, D),
    k and v (B, Hkv, S, D) fp32 or bf16; differentiable in q, k and v. `lens` (B,) int64, for a right-padded batch:
    batch row b sees only keys 0..lens[b]-1 (every query row, as SDPA's with that padding mask; no keys: zero
    outputs). `bias` (B | 1, H | 1, T, S), fp32 or q's dtype: added to the scaled scores, as SDPA adds a float mask
    (MPNet's relative position bias); a bias that wants a gradient takes SDPA (the operator gives it none)."""
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        return flash_attention_reference(q, k, v, scale, causal, lens, bias)
    return _flash_attention(q, k, v, scale, causal, lens, bias)[0]


# -- rotary embedding of whole sequences: x * cos + swap_halves(x) * sin, with its backward --------------------------
def _rope_checks(x, cos, sin) -> None:
    op = "rope"
    _check_strided(op, x=x, cos=cos, sin=sin)
    _check_float(op, "x", x)
    _check_float(op, "cos", cos)
    _check(sin.dtype == cos.dtype and sin.shape == cos.shape, op,
           f"cos and sin must share a dtype and shape, got {cos.dtype} {tuple(cos.shape)} and {sin.dtype} "
           f"{tuple(sin.shape)}")
    _check(x.dim() == 4 and x.shape[-1] % 2 == 0, op, f"expects x (B, H, T, D) with D even, got {tuple(x.shape)}")
    B, _, T, D = x.shape
    _check(cos.dim() == 4 and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (1, T, D), op,
           f"cos and sin must be (B={B} or 1, 1, T={T}, D={D}), got {tuple(cos.shape)}")


def rope_reference(x, cos, sin):
    """The torch computation the kernel reproduces: loom's apply_rotary (sin holds rotate-half's sign)."""
    return x * cos + x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2) * sin


def _rope_run(x, cos, sin, out_dtype, backward: bool):
    B, H, T, D = x.shape
    y = torch.empty(B, H, T, D, dtype=out_dtype)
    x = _unit_stride_last(x)
    cos, sin = _unit_stride_last(cos), _unit_stride_last(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if y.numel():
        build.library().loom_rope(x.data_ptr(), x.dtype is torch.bfloat16, *x.stride()[:3], cos.data_ptr(),
                                  sin.data_ptr(), cos.dtype is torch.bfloat16, cos.stride(0) if cos.shape[0] > 1 else 0,
                                  cos.stride(2), y.data_ptr(), out_dtype is torch.bfloat16, B, H, T, D, backward,
                                  pool_threads())
    return y


def _rope_cpu(x, cos, sin):
    if not (x.dtype in _FLOATS and cos.dtype in _FLOATS and sin.dtype == cos.dtype and x.dim() == 4
            and cos.dim() == 4 and sin.shape == cos.shape and x.shape[-1] % 2 == 0 and cos.shape[0] in (1, x.shape[0])
            and cos.shape[1] == 1 and cos.shape[2:] == x.shape[2:] and x.layout == _STRIDED
            and cos.layout == _STRIDED and sin.layout == _STRIDED):
        _rope_checks(x, cos, sin)
    if build.library() is None:
        return rope_reference(x, cos, sin)
    return _rope_run(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), False)


def _rope_fake(x, cos, sin):
    _rope_checks(x, cos, sin)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype))


def _rope_setup(ctx, inputs, output):
    x, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype = x.dtype


def _rope_backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    if build.library() is None or not (type(grad) in (torch.Tensor, torch.nn.Parameter) and grad.is_cpu):
        with torch.enable_grad():  # autograd of the torch computation itself: each step rounded as torch's
            xr = torch.zeros(grad.shape, dtype=ctx.x_dtype, requires_grad=True)
            return torch.autograd.grad(rope_reference(xr, cos, sin), xr, grad)[0], None, None
    return _rope_run(grad, cos, sin, ctx.x_dtype, True), None, None


rope = _define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", _rope_cpu, _rope_fake, _rope_backward,
               _rope_setup, grad_args=(0,))
