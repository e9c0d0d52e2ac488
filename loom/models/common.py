"""Pieces shared by the model families: attention ("sdpa", or "eager" math that can return its probabilities) with
padding/causal/sliding-window masks, RMSNorm, activations and the loss helpers (rotary embeddings are in
`rope.py`)."""
from __future__ import annotations

import contextlib
import threading
import weakref
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from loom.configuration import ConfigFieldError
from loom.kernels import KernelLinear, ops, policy, threads
from loom.models.cache import Cache, DynamicCache, LayeredCache, StaticCache

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


def check_activation(config, key: str = "hidden_act") -> None:
    """Refuse an activation loom does not have when the config is read, so the error names config.json's key."""
    name = getattr(config, key)
    if name not in ACTIVATIONS:
        raise ConfigFieldError(f"config {key}={name!r} is not supported by loom; use one of "
                               f"{', '.join(sorted(ACTIVATIONS))}", key)


# -- decoder inputs, masks and attention -------------------------------------------------------------------------------
class DecoderInputs(NamedTuple):
    x: torch.Tensor  # (B, T, hidden) input embeddings
    cache: Cache | None  # where this forward reads and writes keys/values
    use_cache: bool  # whether the output returns the cache
    cache_position: torch.Tensor  # (T,) positions of the new tokens
    past: int | None  # tokens seen before (None for a static cache, whose positions stay a tensor)
    masks: dict  # sliding window (None = full attention) -> (mask, is_causal), one per window the layers use
    # layer index -> (mask, is_causal) for the layers whose cache layer keeps another span of positions than the
    # first layer of their window (a cache of layer objects that mixes kinds within one window); else empty
    layer_masks: dict = {}

    def mask(self, layer_idx: int, window: int | None) -> tuple:
        """(mask, is_causal) of layer `layer_idx`, whose sliding window is `window`."""
        return self.layer_masks.get(layer_idx) or self.masks[window]


def check_inputs(input_ids, inputs_embeds) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")


def decoder_inputs(config, embed: nn.Module, input_ids, inputs_embeds, attention_mask, past_key_values, use_cache,
                   cache_position, *, training: bool, windows=(None,), causal: bool = True) -> DecoderInputs:
    """The preamble every causal decoder shares: embed the tokens, pick the cache (a new DynamicCache for inference
    when none is given), then the positions and one mask per attention window (full and sliding layers differ).
    `causal=False` (a decoder family run as an encoder, e.g. EmbeddingGemma) attends both ways and keeps no cache."""
    check_inputs(input_ids, inputs_embeds)
    x = embed(input_ids) if inputs_embeds is None else inputs_embeds
    if not causal:
        if past_key_values is not None or use_cache:
            raise ValueError("this model attends in both directions (config use_bidirectional_attention=True), so "
                             "it keeps no key/value cache: pass use_cache=False and no past_key_values (it embeds "
                             "text; it does not generate)")
        use_cache = False
    use_cache = config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None and not training:
        past_key_values = DynamicCache()
    cache = past_key_values if use_cache or past_key_values is not None else None
    if isinstance(cache, LayeredCache):
        per_layer = list(windows) if len(windows) > 1 else list(windows) * max(len(cache), 1)
        cache_position, past, masks, layer_masks = layered_inputs(cache, attention_mask, cache_position, x.shape[1],
                                                                  x.device, per_layer)
        if layer_masks and len(windows) == 1:  # a family that reads one mask for every layer
            raise ValueError("past_key_values: its layers hold different spans of positions (a Cache(layers=...) "
                             "mixing layer kinds) where this model attends alike in every layer; give every layer "
                             "the same kind, or use a DynamicCache()")
        return DecoderInputs(x, cache, use_cache, cache_position, past, masks, layer_masks)
    masks, past = {}, None
    for window in dict.fromkeys(windows):
        cache_position, past, mask, is_causal = causal_inputs(cache, attention_mask, cache_position, x.shape[1],
                                                              x.device, sliding_window=window, causal=causal)
        masks[window] = (mask, is_causal)
    return DecoderInputs(x, cache, use_cache, cache_position, past, masks)


def layered_inputs(cache: LayeredCache, attention_mask, cache_position, q_len: int, device, windows):
    """`decoder_inputs` for a cache of the reference's layer objects (`cache_layers.py`), whose layers may keep only
    their window: a layer hands the attention the keys of positions kv_offset .. kv_offset + kv_length - 1, as its
    `get_mask_sizes` says before the update, so each mask maps those slots to their positions. `windows` lists each
    layer's window (or one window for all layers). Returns (cache_position, past, masks, layer_masks): one mask per
    window, for the first layer of that window, and one per layer whose span differs from it."""
    past = cache.get_seq_length()
    if cache_position is None:
        cache_position = torch.arange(past, past + q_len, device=device)
    built, masks, layer_masks = {}, {}, {}
    for i, window in enumerate(windows):
        key = (window, cache.get_mask_sizes(q_len, i))
        if key not in built:
            kv_len, offset = key[1]
            if offset == 0 and kv_len == past + q_len:  # every position so far, as a dynamic cache keeps them
                built[key] = attention_mask_for(attention_mask, q_len, past, kv_len, causal=True, device=device,
                                                sliding_window=window)
            else:
                built[key] = (position_mask(attention_mask, cache_position, kv_len, sliding_window=window,
                                            kv_offset=offset), False)
        if window not in masks:
            masks[window] = built[key]
        elif built[key] is not masks[window]:
            layer_masks[i] = built[key]
    return cache_position, past, masks, layer_masks


def check_layer_types(config, allowed=("full_attention", "sliding_attention")) -> None:
    """config.layer_types must name one known attention kind per layer."""
    types, n = config.layer_types, config.num_hidden_layers
    where = f"{config._name_or_path}: " if getattr(config, "_name_or_path", "") else ""
    if not isinstance(types, (list, tuple)) or len(types) != n or any(t not in allowed for t in types):
        raise ConfigFieldError(f"{where}config layer_types={types!r} must list one of {', '.join(allowed)} for each "
                               f"of the num_hidden_layers={n} layers; fix config.json", "layer_types")


def causal_inputs(cache, attention_mask: torch.Tensor | None, cache_position: torch.Tensor | None, q_len: int,
                  device, *, sliding_window: int | None = None, causal: bool = True):
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
    mask, is_causal = attention_mask_for(attention_mask, q_len, past, past + q_len, causal=causal, device=device,
                                         sliding_window=sliding_window)
    return cache_position, past, mask, is_causal


def attention_mask_for(attention_mask: torch.Tensor | None, q_len: int, past_len: int, kv_len: int, *,
                       causal: bool, device, sliding_window: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """Boolean SDPA mask (B, 1, q_len, kv_len), True = attend, and whether SDPA's own is_causal can be used instead.

    Queries sit at positions past_len .. past_len + q_len - 1; keys at 0 .. kv_len - 1. Returns (None, is_causal) on
    the fast paths (no padding, no window in reach), so most calls never build a mask. For a static cache, whose
    positions are a tensor, use `position_mask`. Without `causal`, a sliding window keeps the keys less than
    `sliding_window` positions away on either side.
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
        if window_in_reach:
            q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]
            allowed = ((q_pos - torch.arange(kv_len, device=device)[None, :]).abs() < sliding_window)[None, None]
        return _with_padding(allowed, attention_mask, kv_len), False
    q_pos = torch.arange(past_len, past_len + q_len, device=device)
    return position_mask(attention_mask, q_pos, kv_len, sliding_window=sliding_window), False


def position_mask(attention_mask: torch.Tensor | None, cache_position: torch.Tensor, kv_len: int, *,
                  sliding_window: int | None = None, kv_offset: int = 0) -> torch.Tensor:
    """Causal boolean SDPA mask (B, 1, T, kv_len) for queries at `cache_position` (T positions, a tensor).

    Always builds the mask and never reads a position back to the host, so its shape depends only on T and kv_len:
    a static cache's compiled decode step sees the same graph at every position. `attention_mask` (B, L) marks the
    real tokens; L may exceed kv_len (the Decoder hands a static cache its whole-length mask) or fall short of it (the
    missing keys count as padding). Key slot j holds position `kv_offset` + j (a cache layer that keeps only its
    window drops the positions before kv_offset)."""
    k_pos = torch.arange(kv_offset, kv_offset + kv_len, device=cache_position.device)
    q_pos = cache_position[:, None]
    allowed = k_pos[None, :] <= q_pos  # (T, kv)
    if sliding_window is not None:
        allowed = allowed & (k_pos[None, :] > q_pos - sliding_window)
    return _with_padding(allowed[None, None], attention_mask, kv_len, kv_offset)


def _with_padding(allowed: torch.Tensor, attention_mask: torch.Tensor | None, kv_len: int,
                  kv_offset: int = 0) -> torch.Tensor:
    if attention_mask is not None:
        keep = attention_mask.to(device=allowed.device, dtype=torch.bool)[..., kv_offset:]
        if keep.shape[-1] < kv_len:  # a static cache is longer than the tokens seen so far
            keep = F.pad(keep, (0, kv_len - keep.shape[-1]))
        allowed = allowed & keep[:, None, None, :kv_len]
    # A query with nothing to attend to (a padding position, a row whose mask is all zeros) stays fully masked, as in
    # the reference: SDPA gives it a zero output (and zero gradients), eager attention an average of every value.
    return allowed


_key_lengths_seen: tuple = (None, 0, None)  # (weakref to the last mask read, the batch, its key counts or None)


def key_lengths(mask: torch.Tensor, batch: int) -> torch.Tensor | None:
    """(batch,) int64 key counts when `mask` is a bool (batch | 1, 1, T | 1, S) mask that lets every query row of batch
    row b see exactly the keys 0..n_b - 1 (a right-padded batch, as `attention_mask_for` makes an encoder's mask),
    else None (another form, left padding, per-query windows). Remembered for the last mask read (the layers of one
    forward share theirs; masks are made per forward and not changed in place, and inference tensors keep no version
    counter to tell)."""
    global _key_lengths_seen
    if mask.dtype is not torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch):
        return None
    ref, seen_batch, lens = _key_lengths_seen
    if ref is not None and ref() is mask and seen_batch == batch:
        return lens
    row = mask[:, 0, 0, :]
    n = row.sum(-1)
    lens = None
    if bool((row == (torch.arange(mask.shape[3]) < n[:, None])).all()) and bool((mask == row[:, None, None, :]).all()):
        lens = n.expand(batch).contiguous()
    _key_lengths_seen = (weakref.ref(mask), batch, lens)
    return lens


def encoder_threads(layers: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, config):
    """Context for an encoder's layers on `x` (B, T, hidden) with its attention `mask`: where loom's kernels carry
    every product (policy.encoder_on_kernels) and the attention (SDPA implementation, no mask or a right-padded one),
    torch's own ops run on one thread meanwhile (`kernels_own_threads`); otherwise nothing changes."""
    B, T = x.shape[:2]
    if (getattr(config, "_attn_implementation", None) == "sdpa" and not _recording_open and x.is_cpu
            and ops.eager_now() and policy.encoder_on_kernels(layers, B * T, x.dtype)
            and (mask is None or mask.shape[2] in (1, T) and mask.shape[3] == T and key_lengths(mask, B) is not None)):
        return threads.kernels_own_threads()
    return contextlib.nullcontext()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
         dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, T, D) tensors; grouped kv heads are expanded by SDPA itself.

    A single query per head on CPU without autograd (a decode step) goes to loom::decode_attention: ~10x less time
    than SDPA's dispatch for these sizes, fp32 sums as SDPA's, and no expanded kv heads. Attention over whole
    sequences without a mask (training, prefill) goes to loom::flash_attention (policy.flash_applies), rounded as
    SDPA's CPU flash attention is, and so does an encoder's right-padded batch without autograd, its padding keys
    skipped (policy.padded_flash_applies, `key_lengths`)."""
    if policy.attention_applies(q, k, v, mask, is_causal, dropout):
        return ops.decode_attention(q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is None and not dropout:  # training or prefill without a mask: loom's kernel
        fq, fk, fv = q, k, v
        if torch.is_autocast_enabled("cpu") and q.is_cpu:  # SDPA is on CPU autocast's lower-precision list
            low = torch.get_autocast_dtype("cpu")
            fq, fk, fv = (t.to(low) if t.dtype is torch.float32 else t for t in (q, k, v))
        if policy.flash_applies(fq, fk, fv, mask, is_causal, dropout):
            return ops.flash_attention(fq, fk, fv, scale if scale is not None else q.shape[-1] ** -0.5, is_causal)
    elif policy.padded_flash_applies(q, k, v, mask, is_causal, dropout) and ops.eager_now():  # a padded batch
        # (eager only: the key counts are read back to the host, which a traced or compiled graph must not bake in)
        lens = key_lengths(mask, q.shape[0])
        if lens is not None:
            return ops.flash_attention(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5, False, lens)
    # a plain bool from the static sizes: under torch.jit.trace a comparison of traced sizes would be a tensor
    gqa = int(k.shape[1]) != int(q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                          scale=scale, enable_gqa=gqa)


def fused_decode_attention(q, k, v, cos, sin, mask, cache, layer_idx: int, cache_position, *, implementation: str,
                           scale: float | None) -> torch.Tensor | None:
    """A decode step's RoPE, cache write and attention over (B, 1, heads, D) projections as one kernel call
    (loom::rope_cache_attention): (B, 1, H * D), bitwise what `apply_rotary`, `cache.update` and `attention` give
    for them. None, having changed nothing, wherever that path would not end in loom::decode_attention (eager or
    recorded attention, a cache subclass, autograd, kernels off, ...): the caller then runs those ops. Eager only:
    it reads the position back to the host, which a compiled or traced step must not bake in."""
    if (implementation != "sdpa" or type(cache) not in (DynamicCache, StaticCache) or layer_idx >= len(cache.keys)
            or (_recording_open and _recorded_attentions.get() is not None)
            or not policy.rope_attention_applies(q, k, v, cos, sin, mask) or not ops.eager_now()):
        return None
    kc, vc = cache.keys[layer_idx], cache.values[layer_idx]
    B, _, Hkv, D = k.shape
    if not (kc.dtype is q.dtype and policy.plain(kc) and policy.plain(vc) and kc.shape == vc.shape
            and kc.stride() == vc.stride() and kc.shape[0] == B and kc.shape[1] == Hkv and kc.stride(-2) == D
            and kc.stride(-1) == 1):
        return None
    if mask is not None and mask.shape[-1] != cache.next_length(layer_idx):
        return None
    slot = cache.decode_slot(layer_idx, cache_position)
    if slot is None:
        return None
    kc, vc, position, length = slot
    return ops.rope_cache_attention(q, k, v, cos, sin, kc, vc, position, length, mask,
                                    scale if scale is not None else D ** -0.5)


_LAYER_LINEARS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj"))


def _unhooked(*modules) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


def fused_decode_layer(x, cos, sin, mask, cache, layer_idx: int, cache_position, *, attn, mlp, norms,
                       implementation: str, scale: float | None):
    """A Llama-shaped layer's decode step up to the MLP's activation in one kernel call
    (loom::decode_layer_attention): (x + attention, gate projection, up projection), each bitwise what the modules
    give, since the call chains the kernels those modules' forwards reach. The caller checked that the layer's
    classes are Llama's own (their forwards are the ones this replaces); this checks what may change at any time:
    hooks or a replaced forward on a module it skips, a Linear that is not loom's plain kernel Linear, tensors or
    settings where a module would not reach its kernel. None, having changed nothing, where any of that fails."""
    B, T, _ = x.shape
    dtype, ln1, ln2 = x.dtype, norms[0], norms[1]
    if (T != 1 or implementation != "sdpa" or type(cache) not in (DynamicCache, StaticCache)
            or layer_idx >= len(cache.keys) or torch.is_grad_enabled() or not policy.enabled()
            or (_recording_open and _recorded_attentions.get() is not None) or not ops.eager_now()
            or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
            or B > policy.MAX_ROWS or (B > 1 and dtype is torch.bfloat16 and not policy.EMULATED_BF16)
            or ln1.eps != ln2.eps or type(ln1) is not RMSNorm or type(ln2) is not RMSNorm):
        return None
    linears = [attn._modules.get(n) for n in _LAYER_LINEARS[0]] + [mlp._modules.get(n) for n in _LAYER_LINEARS[1]]
    if not all(type(m) is KernelLinear for m in linears) or not _unhooked(attn, mlp, ln1, ln2, *linears):
        return None
    params = [m._parameters for m in linears]
    weights = [p.get("weight") for p in params]
    biases = [p.get("bias") for p in params]
    ln1_w, ln2_w = ln1._parameters.get("weight"), ln2._parameters.get("weight")
    tensors = (x, ln1_w, ln2_w, *weights, *(b for b in biases if b is not None))
    if (dtype not in policy.DTYPES
            or not all(t is not None and policy.plain(t) and t.dtype is dtype and t.is_contiguous() for t in tensors)):
        return None
    kc, vc = cache.keys[layer_idx], cache.values[layer_idx]
    D, cs = kc.shape[-1], cos.shape
    if not (policy.plain(kc) and policy.plain(vc) and kc.dtype is dtype and vc.dtype is dtype and kc.dim() == 4
            and kc.shape[0] == B and kc.stride(-1) == 1 and kc.stride(-2) == D and kc.stride() == vc.stride()
            and kc.shape == vc.shape and policy.plain(cos) and policy.plain(sin) and cos.dtype is dtype
            and sin.dtype is dtype and len(cs) == 4 and cs[0] in (1, B) and cs[1] == cs[2] == 1 and cs[3] == D
            and sin.shape == cs and cos.stride() == sin.stride() and cos.stride(-1) == 1
            and (mask is None or (policy.plain(mask) and mask.dtype is torch.bool and mask.dim() == 4
                                  and mask.shape[0] in (1, B) and mask.shape[1] == mask.shape[2] == 1
                                  and mask.stride(-1) == 1 and mask.shape[-1] == cache.next_length(layer_idx)))):
        return None
    slot = cache.decode_slot(layer_idx, cache_position)
    if slot is None:
        return None
    kc, vc, position, length = slot
    return ops.decode_layer_attention(x, ln1_w, ln2_w, ln1.eps, *weights, *biases, cos, sin, kc, vc, position, length,
                                      mask, scale if scale is not None else D ** -0.5)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, *,
              implementation: str = "sdpa", dropout: float = 0.0, scale: float | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """The attention a model's config names (`config._attn_implementation`): `sdpa` or `eager_attention`. Soft-capped
    scores (Gemma 2) exist only in the eager math, which the reference uses for them too.

    While a forward records its attentions (output_attentions=True) under "sdpa", this layer runs the eager math to
    form them, and gives queries with nothing to attend to SDPA's zero output: asking for the probabilities never
    changes the model's outputs (the reference's SDPA returns no attentions there, only a warning)."""
    if implementation == "eager" or softcap is not None:
        return eager_attention(q, k, v, mask, is_causal, dropout, scale, softcap)
    if _recording_open and _recorded_attentions.get() is not None:
        out = eager_attention(q, k, v, mask, is_causal, dropout, scale)
        return out if mask is None or mask.dtype != torch.bool else out.masked_fill(~mask.any(-1, keepdim=True), 0)
    return sdpa(q, k, v, mask, is_causal, dropout, scale)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                    dropout: float = 0.0, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v written out, as the reference's eager path, so that its probabilities can be
    returned (`recording_attentions`). Masked scores get the dtype's lowest value, not -inf, as in the reference: a
    query with nothing to attend to averages every value here, where SDPA gives it zeros. With `softcap` the scores
    become softcap * tanh(scores / softcap) before the mask. A float `mask` is a bias added to the scores."""
    if k.shape[1] != q.shape[1]:  # grouped kv heads: query head h reads kv head h // (H / Hkv)
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None and is_causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None and mask.dtype != torch.bool:  # an additive bias (MPNet's relative positions)
        scores = scores + mask
    elif mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, dropout, training=True)
    recorded = _recorded_attentions.get()
    if recorded is not None:
        recorded.append(probs)
    return torch.matmul(probs, v)


_recorded_attentions: ContextVar[list | None] = ContextVar("loom_recorded_attentions", default=None)
# how many recording blocks are open, in any thread: `attention` reads this int first, because torch.compile guards
# on a global's value but breaks its graph at a ContextVar (the var stays the truth for the calling thread)
_recording_open = 0
_recording_lock = threading.Lock()


def recording_attentions(config, output_attentions: bool | None):
    """Context around a model's layers. When `output_attentions` (default: config.output_attentions) asks for them, it
    yields a list that collects each layer's attention probabilities (B, H, Tq, Tk) in order; otherwise None. Under
    any attn_implementation: the layers then compute them eagerly (`attention`)."""
    if output_attentions is None:
        output_attentions = getattr(config, "output_attentions", False)
    if not output_attentions:
        return contextlib.nullcontext()
    return _recording()


@contextlib.contextmanager
def _recording():
    global _recording_open
    with _recording_lock:
        _recording_open += 1
    try:
        with collecting(_recorded_attentions) as found:
            yield found
    finally:
        with _recording_lock:
            _recording_open -= 1


@contextlib.contextmanager
def collecting(var: ContextVar):
    """Set `var` to a fresh list for the duration of the block (and yield it), for the layers to append to."""
    found: list[torch.Tensor] = []
    token = var.set(found)
    try:
        yield found
    finally:
        var.reset(token)


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
        if policy.norm_applies(x, w):
            return ops.rms_norm(x, w, self.eps)  # C: 2-3x faster than torch's ~8 ops inside rms_norm
        if x.dtype is torch.float32 and w.dtype is torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), w, self.eps)
        return w * torch.rms_norm(x, (x.shape[-1],), None, self.eps)


# -- losses --------------------------------------------------------------------------------------------------------
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross entropy; -100 labels are ignored. With num_items_in_batch the sum is divided by it (so
    gradient accumulation can normalise by the token count of the whole accumulated batch)."""
    labels = labels.to(logits.device)
    if policy.loss_applies(logits, labels):
        # every position against the next label (the last against none): no slice or fp32 copy of the logits
        shifted = F.pad(labels[..., 1:], (0, 1), value=-100)
        return token_loss(logits, shifted, num_items_in_batch)
    return token_loss(logits[..., :-1, :], labels[..., 1:], num_items_in_batch)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """F.cross_entropy's mean over the labels that are not -100 (or their sum / num_items_in_batch). Plain CPU
    fp32/bf16 logits go to loom::token_nll, which reads them in their own dtype (the same loss and gradient in fp32:
    the reference's upcast, log_softmax and nll_loss computed row by row)."""
    flat_labels = labels.reshape(-1).to(logits.device)
    if policy.loss_applies(logits, flat_labels):
        total = ops.token_nll(logits.reshape(-1, logits.shape[-1]), flat_labels, -100).sum()
        if num_items_in_batch is None:
            return total / (flat_labels != -100).sum()
    else:
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
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


def span_outputs(logits: torch.Tensor, start_positions=None, end_positions=None):
    """Question answering: (start_logits, end_logits, loss) from (B, T, 2) logits. The loss is the mean of the start
    and end cross entropies; positions past the sequence are ignored, as in the reference."""
    start, end = logits.split(1, dim=-1)
    start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
    loss = None
    if start_positions is not None and end_positions is not None:
        ignored = start.shape[1]
        s = start_positions.reshape(-1).clamp(0, ignored)
        e = end_positions.reshape(-1).clamp(0, ignored)
        loss = (F.cross_entropy(start, s, ignore_index=ignored) + F.cross_entropy(end, e, ignore_index=ignored)) / 2
    return start, end, loss


def maybe_checkpoint(module: nn.Module, enabled: bool, *args, **kwargs):
    """Run a block, with activation checkpointing when gradient checkpointing is on and the model trains (with the
    options gradient_checkpointing_enable stored on the block, e.g. use_reentrant)."""
    if enabled and module.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        run = module
        if _recording_open and _recorded_attentions.get() is not None:
            run = _recording_again(module)
        options = {"use_reentrant": False, **getattr(module, "checkpoint_options", {})}
        return checkpoint(run, *args, **options, **kwargs)
    return module(*args, **kwargs)


def _recording_again(module: nn.Module):
    """`module` for a checkpoint whose forward records attentions: the backward's recomputation, outside the
    recording block, records too (into a list nobody reads), so it takes the same eager path as the forward did."""
    def run(*args, **kwargs):
        if _recorded_attentions.get() is not None:
            return module(*args, **kwargs)
        with _recording():
            return module(*args, **kwargs)
    return run
