"""Mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE): a top-k router and experts as ordinary modules, so
checkpoint keys match one to one and quantization, tensor parallelism, kernels and adapters see plain Linears.

Tokens are grouped per expert: each expert that received tokens runs once on exactly those rows, so a decode step
reads only the active experts' weights. The router is the reference's: softmax in float32 over the router logits,
top-k, renormalised when the family says so, and each expert's output weighted and summed in expert order.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

_recorded: ContextVar[list | None] = ContextVar("loom_router_logits", default=None)


@contextlib.contextmanager
def recording_router_logits(enabled: bool):
    """Around a model's layers: yields a list collecting each MoE block's router logits (tokens, experts) in layer
    order when `enabled`, else None."""
    if not enabled:
        yield None
        return
    found: list[torch.Tensor] = []
    token = _recorded.set(found)
    try:
        yield found
    finally:
        _recorded.reset(token)


class SparseMoE(nn.Module):
    """`gate` (the router Linear) and `experts` (a ModuleList of MLPs, each mapping (n, hidden) -> (n, hidden))."""

    def __init__(self, hidden_size: int, experts: list[nn.Module], top_k: int, normalize: bool,
                 weights_in_logits_dtype: bool) -> None:
        super().__init__()
        if not 0 < top_k <= len(experts):
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the number of experts "
                             f"({len(experts)}); check config.json")
        self.gate = nn.Linear(hidden_size, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.top_k, self.normalize, self.weights_in_logits_dtype = top_k, normalize, weights_in_logits_dtype

    def route(self, x: torch.Tensor):
        """(router logits, top-k weights, top-k expert indices) for (n, hidden) tokens."""
        logits = self.gate(x)
        weights, chosen = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        return logits, weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, chosen = self.route(flat)
        recorded = _recorded.get()
        if recorded is not None:
            recorded.append(logits)
        out = torch.zeros_like(flat)
        slots = chosen.reshape(-1)  # token t's j-th choice is slot t * k + j
        order = slots.argsort(stable=True)
        counts = torch.bincount(slots, minlength=len(self.experts)).tolist()
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                picked = order[start:start + n]
                start += n
                rows = picked // self.top_k
                y = expert(flat[rows]) * weights.reshape(-1)[picked, None]
                out.index_add_(0, rows, y.to(out.dtype))
        return out.reshape(shape)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch-Transformer auxiliary loss over all MoE layers, as the reference computes it (padding tokens
    left out when a mask is given): num_experts * sum_e (fraction of routed slots to e) * (mean router prob of e)."""
    device = router_logits[0].device
    per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0.0
    keep = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    for logits in router_logits:
        probs = F.softmax(logits.to(device), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1)[1].reshape(-1)
        if keep is None:
            per_expert = per_expert + torch.bincount(chosen, minlength=num_experts).float()
            prob_sum = prob_sum + probs.float().sum(0)
            rows = rows + probs.shape[0]
        else:
            per_expert = per_expert + torch.zeros_like(per_expert).scatter_add_(0, chosen, keep.repeat_interleave(top_k))
            prob_sum = prob_sum + (probs.float() * keep[:, None]).sum(0)
            rows = rows + keep.sum()
    return torch.sum((per_expert / rows) * (prob_sum / rows)) * num_experts
