"""Mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE): a top-k router and experts as ordinary modules, so
checkpoint keys match one to one and quantization, tensor parallelism, kernels and adapters see plain Linears.

Tokens are grouped per expert: each expert that received tokens runs once on exactly those rows, so a decode step
reads only the active experts' weights. At decode sizes (inference, up to 16 tokens, loom's kernels on) the experts'
weights are packed on first use into two stacked tensors, each expert's gate and up projections one product, and
the experts' own parameters become views of them (same names, same state dict, nothing copied twice); a step then
runs every routed expert in two kernel calls (loom::moe_gate_up, loom::moe_down) with the activation between,
bitwise what the modules compute. Anything the kernels would bypass (hooks, adapters, quantized or sharded Linears,
biases, a changed expert forward) keeps the module path.

The router is the reference's: softmax in float32 over the router logits, top-k, renormalised when the family says
so, and each expert's output weighted and summed in expert order.

The families build on Llama through `make_mlp` and add two mixins: `RouterLogitsModel` (the base model returns the
router logits) and `AuxLossCausalLM` (the head adds the load-balancing loss), both driven by `output_router_logits`.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels import ops, policy
from loom.kernels.linear import KernelLinear
from loom.models.common import collecting
from loom.outputs import ModelOutput

_recorded: ContextVar[list | None] = ContextVar("loom_router_logits", default=None)


@contextlib.contextmanager
def recording_router_logits(enabled: bool):
    """Around a forward: yields a list collecting each MoE block's router logits (tokens, experts) in layer order
    when `enabled`, else None. Nested uses share the outer list (a head and its base model both ask)."""
    outer = _recorded.get()
    if not enabled or outer is not None:
        yield outer if enabled else None
        return
    with collecting(_recorded) as found:
        yield found


def check_top_k(config, experts_key: str) -> None:
    """num_experts_per_tok must pick between 1 and all of config.<experts_key> experts."""
    top_k, n = config.num_experts_per_tok, getattr(config, experts_key)
    if not 0 < top_k <= n:
        where = f"{config._name_or_path}: " if getattr(config, "_name_or_path", "") else ""
        raise ValueError(f"{where}config num_experts_per_tok={top_k} must be between 1 and {experts_key}={n} (the "
                         f"number of experts); fix config.json")


class Router(KernelLinear):
    """The router's Linear (hidden -> one logit per expert). A subclass, so that quantizers, which convert plain
    Linears only, keep it in full precision: the reference's router is no Linear and is never quantized, and a
    quantized router would move tokens to other experts to save a few bytes."""


class SparseMoE(nn.Module):
    """`gate` (the router) and `experts` (a ModuleList of MLPs, each mapping (n, hidden) -> (n, hidden)). In training,
    `jitter_noise` scales the block's input by uniform noise in [1 - j, 1 + j] (Mixtral's router jitter).
    `linear_names` names each expert's (gate, up, down) Linears where the expert computes
    down(act_fn(gate(x)) * up(x)) (None: the experts always run as modules). A family with a shared expert that every
    token goes through (Qwen2-MoE) sets `shared_expert` (an MLP) and `shared_expert_gate` (a Linear to one logit): the
    block then adds sigmoid(shared_expert_gate(x)) * shared_expert(x) to the routed experts' sum."""
    # bitsandbytes leaves the experts in full precision, as in the reference (whose experts are 3-D parameters, not
    # Linears): a bnb checkpoint then moves between the libraries
    bnb_keeps_experts_full_precision = True

    def __init__(self, hidden_size: int, experts: list[nn.Module], top_k: int, normalize: bool,
                 weights_in_logits_dtype: bool, jitter_noise: float = 0.0,
                 linear_names: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")) -> None:
        super().__init__()
        if not 0 < top_k <= len(experts):
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the number of experts "
                             f"({len(experts)}); check config.json")
        self.gate = Router(hidden_size, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.top_k, self.normalize, self.weights_in_logits_dtype = top_k, normalize, weights_in_logits_dtype
        self.jitter_noise = jitter_noise
        self.linear_names = linear_names
        self.shared_expert: nn.Module | None = None
        self.shared_expert_gate: nn.Module | None = None
        self._expert_forward = type(experts[0]).forward
        self._packed: tuple | None = None  # (gate_up, down, data pointers of the experts' weights), see _packed_experts

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        packed = self._packed
        if packed is not None:
            # .to() / .float() / ... give the parameters new tensors: drop the packed copy (packed again on next use)
            # unless they are still its views (share_memory() moves the storage they share with it)
            gate_up, down = packed[0], packed[1]
            inter = down.shape[2]
            views = [t.data_ptr() for e in range(len(gate_up))
                     for t in (gate_up[e, :inter], gate_up[e, inter:], down[e])]
            weights = [getattr(expert, name).weight for expert in self.experts for name in self.linear_names]
            self._packed = (gate_up, down, views) if [w.data_ptr() for w in weights] == views else None
        return out

    def _expert_weights(self, dtype) -> list[torch.Tensor] | None:
        """Each expert's gate, up and down weights in order, where every expert is the module the kernels replace
        (its class's forward, no hooks, loom's plain Linears without biases, contiguous CPU weights in `dtype`)."""
        names, fwd, out = self.linear_names, self._expert_forward, []
        if names is None:
            return None
        act = None
        for expert in self.experts._modules.values():
            if (type(expert).forward is not fwd or expert._forward_hooks or expert._forward_pre_hooks
                    or "forward" in expert.__dict__):
                return None
            mods = expert._modules
            a = mods.get("act_fn")
            if act is None:
                act = a
            elif type(a) is not type(act) or a.__dict__.get("approximate") != act.__dict__.get("approximate"):
                return None
            for name in names:
                m = mods.get(name)
                if type(m) is not KernelLinear or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
                    return None
                params = m._parameters
                w = params.get("weight")
                if (params.get("bias") is not None or w is None or w.dtype is not dtype or not policy.plain(w)
                        or not w.is_contiguous()):
                    return None
                out.append(w)
        return out

    def _packed_experts(self, x: torch.Tensor):
        """(gate_up (E, 2I, H), down (E, H, I)) holding the experts' weights, packed on first use: each expert's gate
        and up weights become the two halves of gate_up[e], its down weight down[e] (the parameters keep their
        objects and names; their data becomes those views). None where the kernels do not apply."""
        if not (policy.moe_applies(x) and ops.eager_now()) or nn.modules.module._global_forward_hooks \
                or nn.modules.module._global_forward_pre_hooks:
            return None
        weights = self._expert_weights(x.dtype)
        if weights is None:
            return None
        packed = self._packed
        if packed is not None and packed[0].dtype is x.dtype and packed[2] == [w.data_ptr() for w in weights]:
            return packed[0], packed[1]
        self._packed = None
        gate, down = weights[0], weights[2]
        if gate.shape[1] != x.shape[-1] or any(w.shape != gate.shape for w in weights[1::3]) \
                or any(w.shape != down.shape for w in weights[2::3]) or down.shape != gate.shape[::-1]:
            return None
        E, (inter, hidden) = len(self.experts), gate.shape
        with torch.inference_mode(False), torch.no_grad():
            gate_up = torch.empty(E, 2 * inter, hidden, dtype=x.dtype)
            downs = torch.empty(E, hidden, inter, dtype=x.dtype)
            for e in range(E):
                g, u, d = weights[3 * e:3 * e + 3]
                for dst, w in ((gate_up[e, :inter], g), (gate_up[e, inter:], u), (downs[e], d)):
                    dst.copy_(w)
                    w.data = dst
        self._packed = (gate_up, downs, [w.data_ptr() for w in weights])
        return gate_up, downs

    def decode_experts(self, rows: int, dtype: torch.dtype):
        """(gate_up, down) as `_packed_experts` gives them for a `rows`-token step in `dtype` (packing them now if
        they are not yet), for loom's decode plan; None where the module path would not use them."""
        return self._packed_experts(torch.empty(rows, self.gate.in_features, dtype=dtype))

    def _run_packed(self, flat, weights, chosen, packed) -> torch.Tensor:
        gate_up, down = packed
        inter = down.shape[2]
        gu = ops.moe_gate_up(flat, gate_up, chosen)  # (tokens * k, 2I), slots grouped by expert
        h = self.experts[0].act_fn(gu[:, :inter]) * gu[:, inter:]
        return ops.moe_down(h, down, chosen, weights)

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
        out = self.routed(x)
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for (..., hidden) tokens."""
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, chosen = self.route(flat)
        recorded = _recorded.get()
        if recorded is not None:
            recorded.append(logits)
        if flat.shape[0] <= policy.MAX_ROWS:
            packed = self._packed_experts(flat)
            if packed is not None:  # a decode step: every routed expert in two kernel calls
                return self._run_packed(flat, weights.contiguous(), chosen, packed).reshape(shape)
        if flat.shape[0] == 1:  # a decode step: run its k experts directly, summed in expert order as below
            out = torch.zeros_like(flat)
            for expert, j in sorted(zip(chosen[0].tolist(), range(self.top_k))):
                out = out + (self.experts[expert](flat) * weights[:, j:j + 1]).to(out.dtype)
            return out.reshape(shape)
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
            counts = torch.zeros_like(per_expert).scatter_add_(0, chosen, keep.repeat_interleave(top_k))
            per_expert = per_expert + counts
            prob_sum = prob_sum + (probs.float() * keep[:, None]).sum(0)
            rows = rows + keep.sum()
    return torch.sum((per_expert / rows) * (prob_sum / rows)) * num_experts


class RouterLogitsModel:
    """Mixin for a MoE family's base model (listed before LlamaModel): with `output_router_logits` (argument, else
    the config's) the output carries each MoE layer's router logits (tokens, experts) as `router_logits`."""

    def forward(self, *args, output_router_logits=None, **kwargs):
        want = self.config.output_router_logits if output_router_logits is None else output_router_logits
        with recording_router_logits(want) as logits:
            out = super().forward(*args, **kwargs)
        if logits:
            out.router_logits = tuple(logits)
        return out


class AuxLossCausalLM:
    """Mixin for a MoE family's causal-LM head (listed before LlamaForCausalLM): with `output_router_logits` the
    output also carries `router_logits` and the load-balancing `aux_loss`, which joins the loss times
    `router_aux_loss_coef`, as in the reference."""

    def forward(self, input_ids=None, attention_mask=None, *args, output_router_logits=None, **kwargs):
        config = self.config
        want = config.output_router_logits if output_router_logits is None else output_router_logits
        with recording_router_logits(want) as logits:
            out = super().forward(input_ids, attention_mask, *args, **kwargs)
        if not logits:
            return out
        mask = attention_mask
        if mask is not None and mask.shape[-1] * mask.shape[0] != logits[0].shape[0]:
            mask = mask[:, -(logits[0].shape[0] // mask.shape[0]):]  # a cached step routes only the new tokens
        aux = load_balancing_loss(logits, config.num_experts, config.num_experts_per_tok, mask)
        loss = None if out.loss is None else out.loss + config.router_aux_loss_coef * aux.to(out.loss.device)
        return ModelOutput(loss=loss, aux_loss=aux, logits=out.logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions, router_logits=tuple(logits))


def mlp_tp_plan(prefix: str, colwise=("gate_proj", "up_proj"), rowwise=("down_proj",)) -> dict[str, str]:
    """Tensor-parallel entries for MLPs under `prefix` (e.g. 'model.layers.*.mlp.experts.*'): each expert's input
    projections split by output features, its output projection by input features (one all-reduce per expert that
    runs). The router has no entry, so every rank keeps all of it and routes every token the same way."""
    plan = {f"{prefix}.{name}": "colwise" for name in colwise}
    return {**plan, **{f"{prefix}.{name}": "rowwise" for name in rowwise}}
