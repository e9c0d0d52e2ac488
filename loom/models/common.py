"""Pieces shared by the model families: attention over SDPA with padding/causal/sliding-window masks, rotary
embeddings (default, linear and llama3 scaling), RMSNorm, activations and the loss helpers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loom import native

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"hidden_act={name!r} is not supported; use one of {sorted(ACTIVATIONS)}") from None


# -- inference Linear ----------------------------------------------------------------------------------------------
# Decode-sized inputs skip the BLAS on CPU, measured on an AVX2 machine (bench/bench_generate.py prints the floors):
# - up to NATIVE_MAX_ROWS rows of fp32 or bf16: loom's C kernel (loom/native.py), which streams each weight once at
#   close to memory bandwidth: 1.5x F.linear at 1 row, 2-4x at 2-16 rows (bf16 beyond 1 row only where torch
#   emulates bf16: with AMX, torch's own bf16 matmul was faster at 8 rows on the Intel device machine);
# - fp32 up to SKINNY_MAX_ROWS rows (or without the C library): W @ x.T, ~1.5-2x faster than the BLAS's x @ W.T;
# - bf16 on CPUs without bf16 instructions (torch reports AVX2 or less): torch's bf16 matmul emulates them and runs
#   ~5x slower than fp32, so the product is taken in fp32 (exact bf16 inputs, fp32 sums, one rounding to bf16:
#   what a bf16 matmul computes) on a transient fp32 copy of the weight.
NATIVE_MAX_ROWS = 16
SKINNY_MAX_ROWS = 64
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_EMULATED_BF16 = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2")


def _compiling() -> bool:
    """Whether something records or reinterprets the ops: torch.compile/export, torch.jit.trace, or a dispatch mode
    (FakeTensorMode, a FLOP counter). Then the plain torch ops run instead of the C kernels, which are opaque calls
    on raw pointers: they would break a compiled graph at every layer, be baked into a jit trace as constants, read
    fake tensors' missing data, and go uncounted by a mode."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0


def _plain_linear(module: nn.Module) -> bool:
    """Whether `module(x)` is just the product: an `nn.Linear` itself, not a subclass, with no hooks (its own or
    global, such as accelerate's offload) and no replaced forward."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__ and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, with a faster kernel for a plain fp32/bf16 `nn.Linear` on CPU without autograd.

    Anything else (quantized or other Linear subclasses, tensor-parallel DTensor weights, hooked modules such as
    accelerate's offload, training) goes through the module's own call, so it behaves exactly as before.
    """
    if not x.is_cpu or torch.is_grad_enabled() or _compiling() or not _plain_linear(module):
        return module(x)
    params = module._parameters  # one dict lookup each instead of Module.__getattr__ (~2 us per access)
    w, b = params["weight"], params["bias"]
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if type(w) is not nn.Parameter or w.dtype is not x.dtype or x.dtype not in _NATIVE_DTYPES or rows == 0:
        return module(x)
    if (rows <= NATIVE_MAX_ROWS and (rows == 1 or x.dtype is torch.float32 or _EMULATED_BF16)
            and w.is_contiguous() and native.library() is not None):
        return native.dense_gemm(x.reshape(rows, x.shape[-1]).contiguous(), w, None if b is None else b.contiguous(),
                                 (*x.shape[:-1], w.shape[0]))
    x2 = x.reshape(rows, x.shape[-1])
    if x.dtype is torch.float32 and rows <= SKINNY_MAX_ROWS:
        out = _skinny(x2, w, b)
    elif x.dtype is torch.bfloat16 and _EMULATED_BF16:
        xf, wf, bf = x2.float(), w.float(), None if b is None else b.float()
        out = (_skinny(xf, wf, bf) if rows <= SKINNY_MAX_ROWS else F.linear(xf, wf, bf)).bfloat16()
    else:
        return module(x)
    return out.view(*x.shape[:-1], w.shape[0])


def kernels_carry_decode(model: nn.Module, rows: int) -> bool:
    """Whether every matmul of a `rows`-row decode step of `model` runs in loom's C kernels (which then may keep the
    threads while torch's remaining small ops run on one: `native.kernels_own_threads`)."""
    dtype = getattr(model, "dtype", None)
    if (model.device.type != "cpu" or rows > NATIVE_MAX_ROWS or dtype not in _NATIVE_DTYPES
            or (dtype is torch.bfloat16 and rows > 1 and not _EMULATED_BF16) or native.library() is None):
        return False
    for m in model.modules():
        if getattr(m, "_loom_quantized", False):
            if getattr(m, "kernel", None) != "native":
                return False
        elif isinstance(m, nn.Linear) and (not _plain_linear(m) or type(m.weight) is not nn.Parameter
                                           or m.weight.dtype is not dtype):
            return False
    return True


def _skinny(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())  # (N, M)
    return out.t().contiguous()


# -- masks and attention -----------------------------------------------------------------------------------------
def causal_inputs(cache, attention_mask: torch.Tensor | None, cache_position: torch.Tensor | None, q_len: int,
                  device, *, sliding_window: int | None = None):
    """A causal decoder's per-forward inputs for `q_len` new tokens: (cache_position, past_len, mask, is_causal).

    A cache of fixed length (a static cache) keeps the positions a tensor end to end: the mask is built from
    `cache_position` over the whole buffer and past_len is None, so a compiled decode step reads nothing back to the
    host and has one shape at every position. Otherwise (dynamic cache, no cache) past_len is the cache's Python
    length and `attention_mask_for` skips the mask where it can.
    """
    kv_len = cache.get_max_cache_shape() if cache is not None else None
    if kv_len:
        if cache_position is None:
            past = cache.get_seq_length()
            cache_position = torch.arange(past, past + q_len, device=device)
        return cache_position, None, position_mask(attention_mask, cache_position, kv_len,
                                                   sliding_window=sliding_window), False
    past = cache.get_seq_length() if cache is not None else 0
    if cache_position is None:
        cache_position = torch.arange(past, past + q_len, device=device)
    mask, is_causal = attention_mask_for(attention_mask, q_len, past, past + q_len, causal=True, device=device,
                                         sliding_window=sliding_window)
    return cache_position, past, mask, is_causal


def attention_mask_for(attention_mask: torch.Tensor | None, q_len: int, past_len: int, kv_len: int, *,
                       causal: bool, device, sliding_window: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """Boolean SDPA mask (B, 1, q_len, kv_len), True = attend, and whether SDPA's own is_causal can be used instead.

    Queries sit at positions past_len .. past_len + q_len - 1; keys at 0 .. kv_len - 1. Returns (None, is_causal) on
    the fast paths (no padding, no window in reach), so most calls never build a mask. For a static cache, whose
    positions are a tensor, use `position_mask`.
    """
    no_padding = attention_mask is None or bool(attention_mask.all())
    window_in_reach = sliding_window is not None and kv_len > sliding_window
    if no_padding and not window_in_reach and kv_len == past_len + q_len:
        if not causal or q_len == 1:
            return None, False
        if past_len == 0:
            return None, True
    if not causal:
        allowed = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        return _with_padding(allowed, attention_mask, kv_len), False
    q_pos = torch.arange(past_len, past_len + q_len, device=device)
    return position_mask(attention_mask, q_pos, kv_len, sliding_window=sliding_window), False


def position_mask(attention_mask: torch.Tensor | None, cache_position: torch.Tensor, kv_len: int, *,
                  sliding_window: int | None = None) -> torch.Tensor:
    """Causal boolean SDPA mask (B, 1, T, kv_len) for queries at `cache_position` (T positions, a tensor).

    Always builds the mask and never reads a position back to the host, so its shape depends only on T and kv_len:
    a static cache's compiled decode step sees the same graph at every position. `attention_mask` (B, L) marks the
    real tokens; L may exceed kv_len (the Decoder hands a static cache its whole-length mask) or fall short of it (the
    missing keys count as padding)."""
    k_pos = torch.arange(kv_len, device=cache_position.device)
    q_pos = cache_position[:, None]
    allowed = k_pos[None, :] <= q_pos  # (T, kv)
    if sliding_window is not None:
        allowed = allowed & (k_pos[None, :] > q_pos - sliding_window)
    return _with_padding(allowed[None, None], attention_mask, kv_len)


def _with_padding(allowed: torch.Tensor, attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor:
    if attention_mask is not None:
        keep = attention_mask.to(device=allowed.device, dtype=torch.bool)
        if keep.shape[-1] < kv_len:  # a static cache is longer than the tokens seen so far
            keep = F.pad(keep, (0, kv_len - keep.shape[-1]))
        allowed = allowed & keep[:, None, None, :kv_len]
    # A query with nothing to attend to (a padding position) would give NaN; let it attend everywhere instead.
    # Its output is never used, but NaNs would leak into gradients and into batched reductions.
    return allowed | ~allowed.any(-1, keepdim=True)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
         dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, T, D) tensors; grouped kv heads are expanded by SDPA itself.

    A single query per head on CPU without autograd (a decode step) goes to loom's C kernel: ~10x less time than
    SDPA's dispatch for these sizes, fp32 sums as SDPA's, and no expanded kv heads."""
    if q.shape[2] == 1 and _native_attention_ok(q, k, v, mask, is_causal, dropout):
        return native.decode_attention(q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5)
    # a plain bool from the static sizes: under torch.jit.trace a comparison of traced sizes would be a tensor
    gqa = int(k.shape[1]) != int(q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                          scale=scale, enable_gqa=gqa)


def _native_attention_ok(q, k, v, mask, is_causal, dropout) -> bool:
    dtype = q.dtype
    return (not is_causal and not dropout and q.is_cpu and not torch.is_grad_enabled() and dtype in _NATIVE_DTYPES
            and k.dtype is dtype and v.dtype is dtype and q.shape[-1] == k.shape[-1] == v.shape[-1] <= 512
            and q.shape[1] % k.shape[1] == 0 and k.shape[2] > 0
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and (mask is None or (mask.dtype is torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1)
                                  and mask.shape[0] in (1, q.shape[0]) and mask.shape[3] == k.shape[2]
                                  and mask.stride(-1) == 1))
            and not _compiling() and native.library() is not None)


# -- rotary position embeddings ----------------------------------------------------------------------------------
def rope_parameters(config) -> dict:
    """The rope settings of a config in the 5.x `rope_parameters` form, also from legacy rope_theta/rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(params: dict, dim: int) -> torch.Tensor:
    base = float(params.get("rope_theta", 10000.0))
    # explicit CPU: this also runs while a model is built under torch.device("meta"), where math would go through
    # meta decompositions (and import torch._dynamo, seconds of startup)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(params["factor"])
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type={kind!r} is not supported; loom supports 'default', 'linear' and 'llama3'")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, computed in float32 and cast to the activations' dtype.

    Returns (cos, sin) of shape (B, 1, T, D_rot), ready to broadcast over heads, with rotate-half's sign folded into
    sin (its first half is negated), so `apply_rotary` needs only a swap of the two halves. Computed once per forward
    for all layers.
    """

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        self.params = rope_parameters(config)
        self.dim = int(head_dim * float(self.params.get("partial_rotary_factor", 1.0)))
        self.register_buffer("inv_freq", rope_inv_freq(self.params, self.dim), persistent=False)

    def _init_buffers(self, device=None) -> None:
        """Recompute the non-persistent buffer on `device` (after meta-device construction and loading)."""
        self.inv_freq = rope_inv_freq(self.params, self.dim).to(device or "cpu")

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.device != position_ids.device:  # built on meta (the buffer stays on CPU) and run on meta/fake
            inv_freq = inv_freq.to(position_ids.device)
        freqs = position_ids[:, None, :, None].float() * inv_freq.float()  # (B, 1, T, D/2)
        sin = freqs.sin()
        return torch.cat((freqs, freqs), -1).cos().to(dtype), torch.cat((-sin, sin), -1).to(dtype)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] on the last dim (rotate-half without its sign, which `RotaryEmbedding` puts in sin)."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate (B, H, T, D) queries and (B, Hkv, T, D) keys with `RotaryEmbedding`'s (B, 1, T, D_rot) cos/sin.

    q and k are rotated as one tensor (one concatenation instead of a second set of ops); the results are views.
    Bitwise the reference's q * cos + rotate_half(q) * sin: the sign moved into sin is an exact negation."""
    heads, rot = q.shape[1], cos.shape[-1]
    x = torch.cat((q, k), 1)
    if rot == x.shape[-1]:
        x = x * cos + _swap_halves(x) * sin
    else:
        x_rot = x[..., :rot]
        x = torch.cat((x_rot * cos + _swap_halves(x_rot) * sin, x[..., rot:]), -1)
    return x[:, :heads], x[:, heads:]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op instead of ~8 (pow, mean, add, rsqrt, muls, casts), same result as the reference's
        # weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype). Below fp32, torch.rms_norm already normalises in
        # fp32 and rounds once; the weight multiplies after that rounding, as in the reference.
        w = self.weight
        if (x.dtype is w.dtype and x.dtype in _NATIVE_DTYPES and x.is_cpu and not torch.is_grad_enabled()
                and type(w) is nn.Parameter and x.is_contiguous() and not _compiling()
                and native.library() is not None):
            return native.rms_norm(x, w, self.eps)  # C: 2-3x faster than torch's ~8 ops inside rms_norm
        if x.dtype is torch.float32 and w.dtype is torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), w, self.eps)
        return w * torch.rms_norm(x, (x.shape[-1],), None, self.eps)


# -- losses --------------------------------------------------------------------------------------------------------
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross entropy; -100 labels are ignored. With num_items_in_batch the sum is divided by it (so
    gradient accumulation can normalise by the token count of the whole accumulated batch)."""
    logits = logits[..., :-1, :].float()
    labels = labels[..., 1:].to(logits.device)
    return token_loss(logits, labels, num_items_in_batch)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1).to(flat_logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Regression, single-label or multi-label loss, chosen as the reference does (config.problem_type)."""
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
        return F.mse_loss(logits.float(), labels.float())
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels).float(), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def maybe_checkpoint(module: nn.Module, enabled: bool, *args, **kwargs):
    """Run a block, with activation checkpointing when gradient checkpointing is on and the model trains."""
    if enabled and module.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)
