"""Context parallelism: the sequence split across the cp group, attention computed by ring attention.

Load balancing (zig-zag): the sequence is cut into 2 x cp chunks and rank r keeps chunks r and 2cp-1-r, so under a
causal mask every rank does the same amount of work (an early chunk and a late one).

Ring attention: each rank keeps its queries; key/value blocks travel round the ring with point-to-point ops (one
hop per step, overlapped with the compute of the block in hand), and the partial results are merged with the
online-softmax rule (running log-sum-exp). The backward pass walks the ring again: dQ stays home, dK/dV travel with
their block and arrive back at their owner after the last hop. Plain torch.distributed P2P ops, so it runs on gloo
(CPU) and NCCL alike.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


# -- zig-zag layout ------------------------------------------------------------------------------------------------
def check_cp_seq_len(seq_len: int, cp_size: int) -> None:
    if seq_len % (2 * cp_size):
        raise ValueError(f"context parallel size {cp_size} needs the sequence length to be a multiple of 2 x cp = "
                         f"{2 * cp_size}, got {seq_len}; pad the batch to a multiple (e.g. the collator's "
                         f"pad_to_multiple_of={2 * cp_size})")


def zigzag_shard(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of `x` along `dim`: chunks cp_rank and 2*cp_size-1-cp_rank of 2*cp_size."""
    check_cp_seq_len(x.shape[dim], cp_size)
    chunks = x.chunk(2 * cp_size, dim)
    return torch.cat((chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]), dim)


def zigzag_unshard(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of zigzag_shard: the full sequence from every rank's part, in rank order."""
    n = len(parts)
    chunks: list[torch.Tensor | None] = [None] * (2 * n)
    for r, part in enumerate(parts):
        first, second = part.chunk(2, dim)
        chunks[r], chunks[2 * n - 1 - r] = first, second
    return torch.cat(chunks, dim)


def _chunk_ids(rank: int, n: int) -> tuple[int, int]:
    return rank, 2 * n - 1 - rank


# -- one block of attention -----------------------------------------------------------------------------------------
def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    groups = heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _pairs(q_chunks, k_chunks):
    """(q half, k half, causal) for every pair of chunks where some query may see some key."""
    for qa, qid in enumerate(q_chunks):
        for kb, kid in enumerate(k_chunks):
            if kid <= qid:
                yield qa, kb, kid == qid


def _scores(q, k, scale, causal):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        tq, tk = s.shape[-2:]
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _block_forward(q, k, v, q_chunks, k_chunks, scale, out, lse):
    """Merge the attention of local queries over one key/value block into (out, lse), in place (float32)."""
    qs, ks, vs = q.chunk(2, 2), k.chunk(2, 2), v.chunk(2, 2)
    outs, lses = out.chunk(2, 2), lse.chunk(2, 2)
    for qa, kb, causal in _pairs(q_chunks, k_chunks):
        s = _scores(qs[qa], _expand_kv(ks[kb], q.shape[1]), scale, causal)
        blk_lse = torch.logsumexp(s, -1)  # (B, H, Tq)
        blk_out = torch.matmul(torch.exp(s - blk_lse[..., None]), _expand_kv(vs[kb], q.shape[1]))
        new_lse = torch.logaddexp(lses[qa], blk_lse)
        outs[qa].mul_(torch.exp(lses[qa] - new_lse)[..., None]).add_(blk_out * torch.exp(blk_lse - new_lse)[..., None])
        lses[qa].copy_(new_lse)


def _block_backward(q, k, v, dout, lse, delta, q_chunks, k_chunks, scale, dq, dk, dv):
    """Accumulate the gradients of one key/value block into dq (local queries) and dk/dv (the travelling block)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    qs, ks, vs, dos = q.chunk(2, 2), k.chunk(2, 2), v.chunk(2, 2), dout.chunk(2, 2)
    lses, deltas, dqs, dks, dvs = lse.chunk(2, 2), delta.chunk(2, 2), dq.chunk(2, 2), dk.chunk(2, 2), dv.chunk(2, 2)
    for qa, kb, causal in _pairs(q_chunks, k_chunks):
        kx, vx = _expand_kv(ks[kb], heads), _expand_kv(vs[kb], heads)
        p = torch.exp(_scores(qs[qa], kx, scale, causal) - lses[qa][..., None])  # (B, H, Tq, Tk)
        dp = torch.matmul(dos[qa], vx.transpose(-1, -2))
        ds = p * (dp - deltas[qa][..., None]) * scale
        dqs[qa].add_(torch.matmul(ds, kx))
        dk_blk = torch.matmul(ds.transpose(-1, -2), qs[qa])  # (B, H, Tk, D)
        dv_blk = torch.matmul(p.transpose(-1, -2), dos[qa])
        if heads != kv_heads:  # grouped kv heads: sum the gradients of the query heads sharing each kv head
            B, _, T, D = dk_blk.shape
            dk_blk = dk_blk.view(B, kv_heads, heads // kv_heads, T, D).sum(2)
            dv_blk = dv_blk.view(B, kv_heads, heads // kv_heads, T, D).sum(2)
        dks[kb].add_(dk_blk)
        dvs[kb].add_(dv_blk)


# -- ring communication ---------------------------------------------------------------------------------------------
class _Ring:
    """Send a tensor to the next rank of the group and receive the previous rank's, asynchronously."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensor: torch.Tensor):
        recv = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def finish(pending) -> torch.Tensor:
        recv, requests = pending
        for req in requests:
            req.wait()
        return recv


class RingAttention(torch.autograd.Function):
    """Causal attention of zig-zag-sharded (B, H, T_local, D) q and (B, H_kv, T_local, D) k, v over a cp group."""

    @staticmethod
    def forward(ctx, q, k, v, group, scale):
        ring = _Ring(group)
        n, r = ring.size, ring.rank
        qf = q.float()
        kv = torch.stack((k.float(), v.float()))
        out = torch.zeros_like(qf)
        lse = torch.full(qf.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(n):
            pending = ring.start(kv) if step < n - 1 else None
            _block_forward(qf, kv[0], kv[1], _chunk_ids(r, n), _chunk_ids((r - step) % n, n), scale, out, lse)
            if pending is not None:
                kv = ring.finish(pending)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        n, r = ring.size, ring.rank
        qf, do = q.float(), dout.float()
        delta = (do * out).sum(-1)  # (B, H, T): rowsum(dO * O), the softmax-backward correction
        kv = torch.stack((k.float(), v.float()))
        dkv = torch.zeros_like(kv)
        dq = torch.zeros_like(qf)
        for step in range(n):
            pending = ring.start(kv) if step < n - 1 else None
            _block_backward(qf, kv[0], kv[1], do, lse, delta, _chunk_ids(r, n), _chunk_ids((r - step) % n, n),
                            ctx.scale, dq, dkv[0], dkv[1])
            if n > 1:  # the block's gradient moves on with it; after n hops it is back with its owner
                dkv = ring.finish(ring.start(dkv))
            if pending is not None:
                kv = ring.finish(pending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                   scale: float | None = None) -> torch.Tensor:
    """Causal ring attention over the cp `group` (default: the world) of zig-zag-sharded queries/keys/values."""
    group = group or dist.group.WORLD
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return RingAttention.apply(q, k, v, group, scale)


# -- applying it to a model -------------------------------------------------------------------------------------------
def _cp_forward(self, x, cos, sin, mask, is_causal, cache=None, cache_position=None):
    """Llama-family attention with the local (zig-zag) chunk of the sequence; positions come in through cos/sin."""
    from loom.models.rope import apply_rotary

    if cache is not None:
        raise ValueError("context parallelism is for training: pass use_cache=False (no KV cache under cp)")
    if mask is not None:
        raise ValueError("context parallelism supports causal attention without padding; drop the attention_mask "
                         "or pack sequences without pad tokens")
    B, T, _ = x.shape
    q, k, v = (t.transpose(1, 2) for t in self.project(x))  # the family's own projections and q/k norms
    if self.use_rope:
        q, k = apply_rotary(q, k, cos, sin)
    out = ring_attention(q, k, v, self._loom_cp_group, scale=self.scaling)
    return getattr(self, self.o_name)(out.transpose(1, 2).reshape(B, T, -1))


_CP_CLASSES: dict[type, type] = {}


def _cp_class(cls: type) -> type:
    if cls not in _CP_CLASSES:
        _CP_CLASSES[cls] = type(f"ContextParallel{cls.__name__}", (cls,), {"forward": _cp_forward})
    return _CP_CLASSES[cls]


def apply_cp(model: nn.Module, cp_mesh) -> nn.Module:
    """Make every Llama-family attention layer of `model` use ring attention over `cp_mesh` (in place).

    Inputs must then be zig-zag shards of the sequence with their global `position_ids` (see `shard_batch_for_cp`).
    """
    from loom.models.llama import LlamaAttention

    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        raise ValueError(f"context parallelism does not support sliding-window attention (config.sliding_window="
                         f"{window}); set it to None or train without cp")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError("context parallelism does not support attention dropout; set config.attention_dropout=0")
    group = cp_mesh.get_group() if hasattr(cp_mesh, "get_group") else cp_mesh
    if any(w is not None for m in model.modules() for w in getattr(m, "windows", ())):
        raise ValueError(f"context parallelism does not support sliding-window attention (layers with "
                         f"config.sliding_window={window}); train without cp")
    found = 0
    for module in model.modules():
        if isinstance(module, LlamaAttention) and module.softcap is not None:
            raise ValueError(f"context parallelism does not support soft-capped attention scores "
                             f"(config.attn_logit_softcapping={module.softcap}); train without cp")
        if isinstance(module, LlamaAttention):
            module.__class__ = _cp_class(type(module)) if not hasattr(module, "_loom_cp_group") else module.__class__
            module._loom_cp_group = group
            found += 1
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention layers that context parallelism knows "
                         "(the Llama-based families); train it without cp_size")
    model._loom_cp_group = group
    return model


def shard_batch_for_cp(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """This cp rank's share of a causal-LM batch: zig-zag input_ids/position_ids and pre-shifted labels.

    Labels are shifted over the whole sequence before sharding (`shift_labels`), so every chunk's last token still
    predicts the first token of the next chunk. An all-ones attention_mask is dropped; padding is refused.
    """
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    check_cp_seq_len(T, cp_size)
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("context parallelism needs batches without padding (attention_mask has zeros); pack "
                         "sequences or pad with real tokens and label them -100")
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "position_ids")}
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
    out["input_ids"] = zigzag_shard(input_ids, cp_rank, cp_size)
    out["position_ids"] = zigzag_shard(positions, cp_rank, cp_size)
    labels = batch.get("labels")
    if labels is not None:
        shifted = torch.cat((labels[:, 1:], torch.full_like(labels[:, :1], -100)), 1)
        out["shift_labels"] = zigzag_shard(shifted, cp_rank, cp_size)
    return out
