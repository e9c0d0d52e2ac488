"""A decode plan: one generate call's decode steps of a Llama-shaped model without Python per module.

Llama-shaped: Llama's decoder layer and attention (Qwen3's per-head q/k norms included), each layer's feed-forward
either Llama's MLP or `loom.models.moe.SparseMoE`'s mixture of experts (Mixtral, Qwen3-MoE, Qwen2-MoE with its
shared expert). The plan is built once per generate call, after the prefill, where everything the step depends on
is checked (model, layer and module classes, hooks, kernel eligibility, dtypes, devices, the cache); each step then
runs the layers through `loom.kernels.chain.DecodeChain` (one C call per dense layer, two per MoE layer, the MLP's
activation and the routing in torch), a quantized head and the final norm in the chain's last call (module calls
for a dense head, where either has hooks, or where the family changes the logits). Every value is bitwise what the
model's forward computes (the chain reaches the same kernels, and the activation, the routing, the embedding lookup
and the rotary tables are torch's own ops or the model's own methods).

The projections (attention's q, k, v, o; a dense MLP's gate, up, down) may be loom's plain kernel Linears or its
weight-only quantized ones (`Int8Linear`, `Int4Linear` symmetric or asymmetric, `Int8GroupLinear` as GGUF's Q8_0
loads), in any mix: a quantized one runs, inside the same C call, the kernel its module's operator calls at decode
sizes (loom_int8_gemm, loom_int4_gemm, loom_int8_group_gemm, with the same arguments and threads), its product cast
and its bias added as the module does, so the bits are the module's. The plan takes such a module only where its
kernel choice is that C kernel ("native"; group-wise int8 also "torch", the same operator), its buffers are
contiguous, and every instance attribute it holds is one the plan knows; it records those attributes' values and
its class's plain settings (`bits`, any class-level default) and re-checks them at every step, with the modules'
buffers (replaced, or their memory swapped).

Before a step the plan re-checks, at C speed, what may change between steps (hooks registered on any module it
skips, a replaced module, parameter, quantized Linear's buffer or forward, a quantized Linear's settings or an
attribute added to one, train mode, grad mode, torch.compile / tracing / dispatch modes, the attention
implementation, recorded attentions or router logits, a MoE block's routing settings, the cache's buffers and
length). Where anything differs, the step returns None, having changed nothing, and the Decoder runs the model's
forward as usual; so does every model, cache or setting the plan does not cover (sliding windows in reach, hidden
states or attentions asked for, adapter Linears, other quantizers' Linears, variant layers).

Those checks read a few hundred Python objects, which each step's weights have pushed out of the CPU caches (0.1-0.3
ms a token on the bench model, where the whole step outside the products is ~0.2 ms with warm caches). They are only
needed where code other than loom's may have run since the last check: the generate loop says when it runs none
between steps (`quiet`: no streamer but loom's own TextStreamer printing to a plain stdout, only loom's own logits
processors and the max-length / EOS criteria), and the plan adds what it sees itself: the modules a step calls (final
norm, head) are loom's leaf modules without hooks, the model's class is loom's, and the interpreter runs nothing of
its own accord (no other Python thread but tqdm's monitor and idle thread-pool workers, no trace or profile
function, no gc callback, no `sys.monitoring` tool), read before every check and every step. Where all of that
holds after a full check, the next steps check only what the plan itself moves (the cache and its length, the
position, grad mode); anything else sends the next step back to the full check. Not covered: code that none of
those show (audit hooks, finalizers, signal handlers, threads started from C that call into Python, a custom Python
decoder inside the streamer's tokenizer) changing the model in the middle of a generate.

Greedy runs (`greedy`, session 18): where a quiet generate asks nothing of a step but its token (greedy, one
unpadded row, no processors, scores or hidden states, no streamer but loom's TextStreamer, fed after each run) and
the chain runs every layer of a float32 or bfloat16 model with SiLU, runs of steps go into one C call each
(csrc/decode.c loom_decode_chain_greedy; up to GREEDY_RUN tokens, about GREEDY_SECONDS long): each token's embedding
row, every layer (the MLP's SiLU and product in C with torch's silu_ and mul_ bits, csrc/silu.c), the final norm and
head (a dense head too, which the per-step path calls as modules), torch.argmax's pick and the EOS check. The rotary
tables of a run come from one call of the model's own rotary module over its positions (each position's values
alone, so dynamic and longrope scaling, whose tables depend on the longest position, keep the steps). Between runs
the plan checks what `still` checks; Python (signals included) runs between runs.
"""
from __future__ import annotations

import gc
import operator
import queue
import sys
import threading
import time
import weakref
from concurrent.futures import thread as _pool
from itertools import repeat

import torch
from torch import nn

from loom.kernels import KernelLinear, ops, policy
from loom.kernels.chain import DecodeChain, LayerTensors, Quantized, Routing, silu_
from loom.models import common, moe
from loom.models.cache import DynamicCache, StaticCache
from loom.models.common import RMSNorm
from loom.models.moe import AuxLossCausalLM, Router, RouterLogitsModel, SparseMoE
from loom.models.rope import RotaryEmbedding

_ATTN_LINEARS, _MLP_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
_is = operator.is_
_training = operator.attrgetter("training")
_data_ptr = torch.Tensor.data_ptr

_module_hooks = nn.modules.module


_monitoring = getattr(sys, "monitoring", None)  # Python 3.12+
_POOL_WORKER = getattr(_pool, "_worker", None)  # the function a ThreadPoolExecutor's threads run (CPython)


def _bystander(thread) -> bool:
    """A thread known to run none of the user's code: tqdm's monitor (started by the first progress bar, e.g. a hub
    download's, and alive for the rest of the process), which only adjusts progress bars; or an idle worker of a
    concurrent.futures thread pool (`_idle_worker`)."""
    cls = type(thread)
    return (cls.__name__ == "TMonitor" and cls.__module__ == "tqdm._monitor") or _idle_worker(thread)


def _idle_worker(thread) -> bool:
    """A ThreadPoolExecutor's worker waiting in its work queue, in a pool with nothing queued and every worker idle
    (as torch.compile leaves inductor's compile pool after its first compile): it runs no Python code until a thread
    submits work, and the other threads are this one (running loom's code) or such workers. A worker running an item
    or its initializer, or any layout of the pool's internals other than CPython's (3.9-3.13), is not idle."""
    if _POOL_WORKER is None or getattr(thread, "_target", None) is not _POOL_WORKER:
        return False
    args = getattr(thread, "_args", ())
    ref = next((a for a in args if type(a) is weakref.ReferenceType), None)
    work = next((a for a in args if type(a) is queue.SimpleQueue), None)
    executor = ref() if ref is not None else None
    if executor is None or work is None or not work.empty():
        return False
    idle, threads = getattr(executor, "_idle_semaphore", None), getattr(executor, "_threads", None)
    # a worker counts as idle (a release of the semaphore) after each item it ran; submit takes one back
    return idle is not None and threads is not None and getattr(idle, "_value", -1) >= len(threads)


def _interpreter_quiet() -> bool:
    """Whether the interpreter runs no Python code of its own accord besides this thread's: no other Python thread
    (but tqdm's monitor and idle thread-pool workers), no trace or profile function, no gc callback, no
    sys.monitoring tool (the module docstring)."""
    return ((threading.active_count() == 1 or all(t is threading.current_thread() or _bystander(t)
                                                  for t in threading.enumerate()))
            and sys.gettrace() is None and sys.getprofile() is None and not gc.callbacks
            and (_monitoring is None or all(_monitoring.get_tool(i) is None for i in range(6))))


def _loom_leaf(module) -> bool:
    """A module whose call runs only loom's (or torch's Linear's) code: no hooks, no forward of its own, no
    children, a class from loom or nn.Linear."""
    cls = type(module)
    return ((cls is nn.Linear or cls.__module__.startswith("loom.")) and not module._modules
            and not module._forward_hooks and not module._forward_pre_hooks and "forward" not in module.__dict__)


def _routing_settings(block: dict) -> tuple:
    """What a SparseMoE's step reads besides its modules' state (from its __dict__; read at every step): its routing
    settings, and how many children it has (a shared expert set after the plan was built adds one)."""
    return block["top_k"], block["normalize"], block["weights_in_logits_dtype"], len(block["_modules"])


# The instance attributes loom's quantized Linears hold besides nn.Module's own (whose values the plan records at build
# time and compares at every step): any other attribute (a setting added later, e.g. one that makes an Int4Linear
# call another operator) keeps the plan off for its model.
_QUANT_KEYS = {"Int8Linear": {"in_features", "out_features", "bias", "kernel", "_packed", "_packed_stamp"},
               "Int8GroupLinear": {"in_features", "out_features", "bias", "kernel", "group_size"},
               # activation_bits: 16 or 8 (loom::int4_linear_a8's kernel); the tiles (_a8, _a8_stamp) are checked
               # apart (_TILE_KEYS)
               "Int4Linear": {"in_features", "out_features", "bias", "kernel", "group_size", "asymmetric",
                              "activation_bits", "tiles_for_decode"}}
_TILE_KEYS = ("_a8", "_a8_stamp")
_NN_MODULE_KEYS = frozenset(nn.Module().__dict__)
_proxy_get = type(type.__dict__).get  # a class's __dict__ (a mappingproxy) .get
_SCALARS = (bool, int, float, str, type(None))


def _class_settings(classes) -> tuple[list, list]:
    """The __dict__s of the quantized Linear classes and their bases below nn.Linear, and (class __dict__, key, value)
    for the plain values (bool, int, float, str, None) they hold (`bits`, and any class-level default a setting may
    read): recorded at build time and compared at every step."""
    bases = {k: None for cls in classes for k in cls.__mro__ if k not in (nn.Linear, nn.Module, object)}
    dicts = [k.__dict__ for k in bases]
    plain = [(d, key, v) for d in dicts for key, v in d.items() if type(v) in _SCALARS and not key.startswith("__")]
    return dicts, plain


def _quantized(m):
    """(its weight, `Quantized`, its recorded settings: [(key, value)]) for one of loom's weight-only quantized
    Linears whose forward takes, at decode sizes, exactly one C kernel the chain can call (the same arguments);
    None for any other module or setting (another kernel choice, an attribute the plan does not know)."""
    linear = sys.modules.get("loom.quantization.linear")
    if linear is None or getattr(m, "_loom_quantized", False) is not True:
        return None
    cls = type(m)
    if (cls not in (linear.Int8Linear, linear.Int8GroupLinear, linear.Int4Linear)
            or cls.forward is not linear._QuantLinear.forward):
        return None
    d = m.__dict__
    bits = d.get("activation_bits", 16)
    if bits not in (8, 16):
        return None
    settings = [(k, v) for k, v in d.items() if k not in _NN_MODULE_KEYS and k not in _TILE_KEYS]
    if any(k not in _QUANT_KEYS[cls.__name__] for k, _ in settings):
        return None
    if any(isinstance(v, (torch.Tensor, nn.Module, dict, list, set)) for _, v in settings):
        return None  # the fbgemm path's packed weight and stamp: not the C kernel
    buffers = m._buffers
    weight, scale = buffers.get("weight"), buffers.get("weight_scale")
    if weight is None or scale is None:
        return None
    if cls is linear.Int8Linear:
        if d.get("kernel") != "native":
            return None
        q = Quantized("int8", scale)
    elif cls is linear.Int8GroupLinear:
        if d.get("kernel") not in ("native", "torch"):
            return None
        q = Quantized("int8_group", scale, None, d.get("group_size"))
    else:
        asymmetric = d.get("asymmetric")
        zero = buffers.get("weight_zero") if asymmetric else None
        if d.get("kernel") != "native" or type(asymmetric) is not bool or (asymmetric and zero is None):
            return None
        # the tiles its forward reads (made in one huge-page buffer by DecodePlan.build), or the saved layout;
        # 8-bit activations (set_activation_bits): loom::int4_linear_a8's kernel on the tiles
        if bits == 8 and not (weight.device.type == "cpu" and d.get("group_size", 0) % 32 == 0):
            return None
        tiles = m.a8_tiles() if bits == 8 else m.decode_tiles()
        q = Quantized("int4", scale, zero, d.get("group_size"), tiles, a8=bits == 8)
    if not q.check(weight):
        return None
    return weight, q, settings + [("training", m.training)]


def _projection(m):
    """(weight, Quantized or None, recorded settings) of a projection the chain computes; None for any other."""
    if type(m) is KernelLinear:
        w = m._parameters.get("weight")
        return None if w is None else (w, None, [])
    return _quantized(m)


def _activation(act: nn.Module):
    """The in-place torch op for a layer's activation module, where the plan knows one (same kernel, same bits)."""
    if type(act) is nn.SiLU and not act.inplace:
        return silu_
    return None


def _forwards(module, mixin, cls) -> bool:
    """Whether `module`'s forward is `cls`'s, or `mixin`'s calling `cls`'s (a MoE family's router-logits mixin,
    which changes nothing while no router logits are asked for)."""
    found = [f for f in (k.__dict__.get("forward") for k in type(module).__mro__) if f is not None]
    return found[0] is cls.forward or (found[0] is mixin.forward and found[1] is cls.forward)


def _attention_shaped(layer, llama) -> bool:
    """Whether `layer` runs Llama's own layer and attention forwards (Qwen3's per-head norms allowed), the path whose
    decode step the chain computes."""
    if type(layer).forward is not llama.LlamaDecoderLayer.forward:  # a variant layer may lack Llama's modules
        return False
    attn = layer.self_attn
    return (type(attn).forward is llama.LlamaAttention.forward
            and type(attn).project is llama.LlamaAttention.project and attn.qkv_name is None
            and attn.o_name == "o_proj" and attn.use_rope and attn.softcap is None)


def _shared_expert(block, llama):
    """A MoE block's shared expert as the chain takes it: (weights of its gate, gate, up and down projections, their
    biases, its activation in place, its modules); None where the block has none; False where the chain does not
    compute it (not Llama's MLP, not loom's plain kernel Linears, an activation the plan does not know)."""
    mlp, gate = block._modules.get("shared_expert"), block._modules.get("shared_expert_gate")
    if mlp is None and gate is None:
        return None
    if mlp is None or gate is None or type(mlp).forward is not llama.LlamaMLP.forward:
        return False
    linears = [gate] + [mlp._modules.get(n) for n in _MLP_LINEARS]
    act = mlp._modules.get("act_fn")
    act_ = _activation(act)
    if act_ is None or not all(type(m) is KernelLinear for m in linears):
        return False
    weights = [m._parameters.get("weight") for m in linears]
    if any(w is None for w in weights):
        return False
    return weights, [m._parameters.get("bias") for m in linears], act_, [mlp, act, *linears]


def _layer(layer, mlp, llama, rows: int, dtype):
    """(LayerTensors, modules whose hooks and children the plan checks, modules whose `training` it checks, tensors
    it checks for a swapped `.data` beyond those the chain reads, the MoE block or None, the quantized projections as
    (module, recorded settings)) for one layer; None where the chain does not compute its step."""
    if not _attention_shaped(layer, llama):
        return None
    attn, norms = layer.self_attn, (layer.input_layernorm, layer.post_attention_layernorm)
    if not (all(type(n) is RMSNorm for n in norms) and norms[0].eps == norms[1].eps):
        return None
    qk = (attn.q_norm, attn.k_norm)
    if qk != (None, None) and not (all(type(n) is RMSNorm for n in qk) and qk[0].eps == qk[1].eps):
        return None
    linears = [attn._modules.get(n) for n in _ATTN_LINEARS]
    checked, moded, extra = [layer, attn, *norms, *(n for n in qk if n is not None)], [layer, attn, mlp], []
    routing = block = None
    if type(mlp).forward is llama.LlamaMLP.forward:
        linears += [mlp._modules.get(n) for n in _MLP_LINEARS]
        act = mlp._modules.get("act_fn")
        checked += [mlp, act]
        projections = [_projection(m) for m in linears]
    elif (type(mlp).forward is SparseMoE.forward and type(mlp).routed is SparseMoE.routed
          and type(mlp)._run_packed is SparseMoE._run_packed and type(mlp).route is SparseMoE.route
          and type(mlp.gate) is Router):
        packed = mlp.decode_experts(rows, dtype)
        experts = list(mlp.experts)
        acts = [e._modules.get("act_fn") for e in experts]
        act = acts[0]
        if packed is None or not all(type(a) is type(act) and _activation(a) is not None for a in acts):
            return None
        linears.append(mlp.gate)
        projections = [_projection(m) for m in linears[:4]]
        projections += [(t, None, []) for t in (mlp.gate._parameters.get("weight"), *packed)]
        expert_linears = [e._modules.get(n) for e in experts for n in mlp.linear_names]
        checked += [mlp, mlp.experts, *experts, *acts, *expert_linears]
        extra = [m._parameters.get("weight") for m in expert_linears]
        shared = _shared_expert(mlp, llama)
        if shared is False:
            return None
        if shared is not None:
            checked += shared[3]
        routing = Routing(mlp.top_k, mlp.normalize, mlp.weights_in_logits_dtype, *(shared or (None,) * 3)[:3])
        block = mlp
    else:
        return None
    act_ = _activation(act)
    if act_ is None or None in projections or any(p[0] is None for p in projections) or None in extra:
        return None
    weights, quant = [p[0] for p in projections], [p[1] for p in projections]
    quantized = [(m, p[2]) for m, p in zip(linears, projections) if p[1] is not None]
    checked += linears
    scale = attn.scaling if attn.scaling is not None else attn.head_dim ** -0.5
    lt = LayerTensors(norms[0]._parameters.get("weight"), norms[1]._parameters.get("weight"), weights,
                      [m._parameters.get("bias") for m in linears] + [None] * (7 - len(linears)), norms[0].eps,
                      scale, act_, routing, *(None if n is None else n._parameters.get("weight") for n in qk),
                      qk[0].eps if qk[0] is not None else 0.0, quant)
    return lt, checked, moded, extra, block, quantized


def _head(model, base, llama, chain: DecodeChain):
    """Give `chain` the model's final norm and head where the chain computes them as the modules do (Llama's
    logits, an RMSNorm, a quantized head `_projection` takes, neither with hooks or a forward of its own): (the
    modules to check, [(the head, its recorded settings)]); None where the step calls the modules instead."""
    norm, head = base._modules.get(base.norm_name), model._modules.get("lm_head")
    if not (type(model).finish_logits is llama.LlamaForCausalLM.finish_logits and type(norm) is RMSNorm
            and head is not None and _loom_leaf(norm) and _loom_leaf(head)):
        return None
    found, weight = _projection(head), norm._parameters.get("weight")
    if found is None or found[0] is None or weight is None:
        return None
    # a dense head runs as module calls at each step: a dense fp32 head (154 MB on the bench model) decoded ~0.2 ms a
    # token slower in the chain's step than as module calls in the medians of interleaved runs (the same kernel and
    # arguments; not understood), while int8 and int4 heads gained 0.1-0.25 ms (their module path is the longest
    # Python). The chain still holds it for runs of greedy steps in one call (DecodeChain.greedy).
    quantized = found[1] is not None
    try:
        chain.set_head(weight, norm.eps, found[0], head._parameters.get("bias"), found[1], in_step=quantized)
    except ValueError:
        return None
    return ([norm, head], [(head, found[2])]) if quantized else ([], [])


def _positions_free(base) -> bool:
    """Whether every rotary table of `base` is a function of each position alone (not of the longest position asked
    for, as dynamic NTK and longrope scaling are), so a run of positions' tables is each position's."""
    return all(m.params.get("rope_type") not in ("dynamic", "longrope") for m in base.modules()
               if isinstance(m, RotaryEmbedding))


GREEDY_RUN = 64  # at most this many greedy tokens per C call
GREEDY_FIRST = 4  # the first run's tokens, which time a token
GREEDY_SECONDS = 0.1  # then runs of about this long: Python (Ctrl-C, the checks) comes back this often on any model


class DecodePlan:
    """See the module docstring. `build` returns None where the plan does not apply."""

    @classmethod
    def build(cls, model, cache, rows: int) -> DecodePlan | None:
        # Llama's classes from the loaded module (a Llama-shaped model has loaded it): importing it here would close
        # an import cycle (models -> modeling -> generation)
        llama = sys.modules.get("loom.models.llama")
        if llama is None:
            return None
        LlamaForCausalLM, LlamaModel = llama.LlamaForCausalLM, llama.LlamaModel
        base = getattr(model, "model", None)
        if not (isinstance(model, LlamaForCausalLM) and _forwards(model, AuxLossCausalLM, LlamaForCausalLM)
                and isinstance(base, LlamaModel) and _forwards(base, RouterLogitsModel, LlamaModel)
                and type(base).embed is LlamaModel.embed and base.causal
                and type(cache) in (DynamicCache, StaticCache)):
            return None
        config, dtype = model.config, model.dtype
        windows = set(base.windows)
        if (len(windows) != 1 or config._attn_implementation != "sdpa" or getattr(config, "output_attentions", False)
                or dtype not in policy.DTYPES or not policy.enabled() or rows > policy.MAX_ROWS
                or (rows > 1 and dtype is torch.bfloat16 and not policy.batched_bf16())):
            return None
        embed = base.embed_tokens
        if type(embed) is not nn.Embedding or embed.max_norm is not None:
            return None
        layers, tensors, checked = list(base.layers), [], [model, base, base.layers, embed]
        moded = [model, base]  # the modules whose forward reads `training` (Linear, RMSNorm, SiLU... do not)
        extra = []  # tensors the chain does not read whose `.data` the forward does (the experts' own weights)
        blocks = []  # the MoE blocks, whose routing settings are checked at each step
        quantized = []  # (quantized Linear, its recorded settings), checked at each step
        linear = sys.modules.get("loom.quantization.linear")
        if linear is not None:  # int4 layers' tiles for decode, made together now rather than one by one in _quantized
            linear.make_tiles([m for m in model.modules() if type(m) is linear.Int4Linear and m.weight.is_cpu
                               and (m.__dict__.get("activation_bits", 16) == 8 or m.wants_tiles())])
        if len(layers) == 0 or len(cache.keys) != len(layers) or (type(cache) is DynamicCache
                                                                  and len(set(cache.length)) != 1):
            return None
        for layer in layers:
            mlp = getattr(layer, getattr(layer, "mlp_name", "mlp"), None)
            found = None if mlp is None else _layer(layer, mlp, llama, rows, dtype)
            if found is None:
                return None
            tensors.append(found[0])
            checked += found[1]
            moded += found[2]
            extra += found[3]
            if found[4] is not None:
                blocks.append(found[4])
            quantized += found[5]
        if not all(t is not None and policy.plain(t) and t.dtype is dtype for lt in tensors
                   for t in lt.float_tensors()) \
                or embed.weight.dtype is not dtype or any(not policy.plain(t) for t in extra):
            return None
        try:
            chain = DecodeChain(tensors, rows, dtype, layers[0].self_attn.head_dim)
            for i in range(len(layers)):
                chain.set_cache(i, cache.keys[i], cache.values[i])
        except ValueError:  # a tensor the kernels do not take (the chain's checks say which): the modules' path
            return None
        head = _head(model, base, llama, chain)
        if head is not None:  # the final norm and head in the chain's last call: checked as the layers' modules are
            checked += head[0]
            quantized += head[1]
        return cls(model, base, cache, chain, checked, moded, windows.pop(), extra, blocks, quantized)

    def __init__(self, model, base, cache: DynamicCache | StaticCache, chain: DecodeChain, modules: list, moded: list,
                 window, extra: list = (), blocks: list = (), quantized: list = ()) -> None:
        self.model, self.base, self.cache, self.chain, self.window = model, base, cache, chain, window
        self.config, self.dtype, self.rows, self.n = model.config, chain.dtype, chain.rows, chain.n
        self.embed_weight = base.embed_tokens.weight
        self.norm = getattr(base, base.norm_name)
        self.modules, self.moded = tuple(modules), tuple(moded)
        self.hooks = tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))
        self.instance_dicts = tuple(m.__dict__ for m in modules)
        # what each module holds now: (its _modules or _parameters dict, name, the object), checked for identity
        slots = [(m._modules, name, child) for m in modules for name, child in m._modules.items()]
        slots += [(m._parameters, name, p) for m in modules for name, p in m._parameters.items()]
        slots += [(base._modules, "embed_tokens", base.embed_tokens)]
        # the quantized Linears' buffers (weight, scale, zero point): a replaced one is a different product
        slots += [(m._buffers, name, t) for m, _ in quantized for name, t in m._buffers.items()]
        # int4 layers whose product reads tiles: the tiles themselves, and the in-place versions of the tensors
        # they were made from (the module's forward would remake them: Int4Linear.tiles_current)
        quants = [q for lt in chain.layers for q in lt.quant] + ([chain.head[3]] if chain.head is not None else [])
        tiled = [m for m, _ in quantized if isinstance(m.__dict__.get("_a8"), torch.Tensor)
                 and any(q is not None and q.tiles is m.__dict__["_a8"] for q in quants)]
        slots += [(m.__dict__, "_a8", m.__dict__["_a8"]) for m in tiled]
        # (the stamp each module made its tiles with: the tensors, then their versions; None = no version kept)
        stamps = [m._a8_stamp for m in tiled]
        self.tile_sources = tuple(t for st in stamps for t, v in zip(st[:3], st[3:]) if v is not None)
        self.tile_versions = tuple(v for st in stamps for v in st[3:] if v is not None)
        # the versions are read in C: every source kept one at build time (an inference tensor, which keeps none, is
        # left out above, and a tensor does not change kind)
        self.version_of = operator.attrgetter("_version")
        self.slot_dicts, self.slot_names, self.slot_values = (tuple(s) for s in zip(*slots))
        # the tensors the chain reads through pointers: a swapped `.data` moves them
        self.pointed = (tuple(t for lt in chain.layers for t in lt.tensors()) + tuple(extra)
                        + tuple(chain.head_tensors()))
        self.addresses = tuple(t.data_ptr() for t in self.pointed)
        self.keys, self.values = tuple(cache.keys), tuple(cache.values)
        self.x2d = chain.x.view(self.rows, chain.hidden)
        self.mask_source = self.mask = None  # a padded batch's attention mask, and it as bools
        self.routed = bool(blocks)  # MoE layers: router logits not recorded, routing settings as built
        self.block_dicts = tuple(b.__dict__ for b in blocks)
        self.routing = tuple(map(_routing_settings, self.block_dicts))
        # a static cache: its length, over which each step attends with a mask (None: a dynamic cache)
        self.static = cache.max_cache_len if type(cache) is StaticCache else None
        # the quantized Linears' settings (kernel, group size, layout, bias and any attribute they hold): each
        # step compares their values and how many attributes each module holds (one added or removed changes that);
        # the same for their classes' plain values (a class-level setting changed or added)
        self.q_dicts = tuple(m.__dict__ for m, _ in quantized)
        classes = dict.fromkeys(type(m) for m, _ in quantized)
        c_dicts, class_settings = _class_settings(classes)
        self.c_dicts = tuple(c_dicts)
        self.c_lens = tuple(map(len, self.c_dicts))
        self.c_at = tuple(d for d, _, _ in class_settings)
        self.c_keys = tuple(k for _, k, _ in class_settings)
        self.c_values = [v for _, _, v in class_settings]
        self.q_lens = tuple(map(len, self.q_dicts))
        self.q_at = tuple(m.__dict__ for m, settings in quantized for _ in settings)
        self.q_keys = tuple(k for _, settings in quantized for k, _ in settings)
        self.q_values = [v for _, settings in quantized for _, v in settings]
        # after a full check: whether the next step may check only what the plan moves (see the module docstring)
        self.settled = False

    def unchanged(self, cache, pos: int) -> bool:
        """Whether everything the plan checked when it was built still holds (see the module docstring)."""
        return (cache is self.cache and not torch.is_grad_enabled() and not common._recording_open
                and not _module_hooks._global_forward_hooks and not _module_hooks._global_forward_pre_hooks
                and self.config._attn_implementation == "sdpa" and policy.enabled() and ops.eager_now()
                and not any(self.hooks) and not any(map(operator.contains, self.instance_dicts, repeat("forward")))
                and not any(map(_training, self.moded))
                and all(map(_is, map(dict.get, self.slot_dicts, self.slot_names), self.slot_values))
                and tuple(map(_data_ptr, self.pointed)) == self.addresses and len(self.base.layers) == self.n
                and tuple(map(len, self.q_dicts)) == self.q_lens
                and (not self.tile_sources or tuple(map(self.version_of, self.tile_sources)) == self.tile_versions)
                and list(map(dict.get, self.q_at, self.q_keys)) == self.q_values
                and tuple(map(len, self.c_dicts)) == self.c_lens
                and list(map(_proxy_get, self.c_at, self.c_keys)) == self.c_values
                and len(cache.keys) == self.n
                and (cache.length.count(pos) == self.n if self.static is None else int(cache.seen) == pos)
                and (self.window is None or pos < self.window)
                and not (self.routed and (moe._recorded.get() is not None
                                          or getattr(self.config, "output_router_logits", False)
                                          or tuple(map(_routing_settings, self.block_dicts)) != self.routing)))

    def _rebind(self, cache) -> bool:
        """Point the chain at the cache's buffers after something replaced them (beam search's reorder)."""
        self.keys = self.values = ()  # matched again only once every layer is rebound
        try:
            for i in range(self.n):
                self.chain.set_cache(i, cache.keys[i], cache.values[i])
        except ValueError:
            return False
        self.keys, self.values = tuple(cache.keys), tuple(cache.values)
        return True

    def still(self, cache, pos: int) -> bool:
        """After a full check and only loom's code since (the module docstring): what the plan itself moves."""
        return (cache is self.cache and not torch.is_grad_enabled() and _interpreter_quiet()
                and (cache.length.count(pos) == self.n if self.static is None else int(cache.seen) == pos)
                and (self.window is None or pos < self.window))

    def greedy(self, seqs: torch.Tensor, cur: int, pos: int, eos: torch.Tensor) -> int:
        """Greedy tokens for the one row written to seqs[0, cur:] (up to its end, or a token in `eos`), feeding
        seqs[0, cur - 1] at position `pos` first, in runs of tokens each one C call
        (DecodeChain.greedy): for a quiet generate (the module docstring) after a full check, layers the chain runs
        whole with SiLU (float32 or bfloat16), a dynamic cache, rotary tables of each position alone. Between runs it
        checks what `still` checks. Returns the tokens written (0 where this does not apply: the caller steps as
        before); the cache then holds every position but the last token's, as after that many steps."""
        chain, cache, model = self.chain, self.cache, self.model
        if not (self.settled and self.static is None and self.window is None and chain.head is not None
                and self.still(cache, pos) and chain.greedy_fits(self.embed_weight) and _positions_free(self.base)
                and self.base._modules.get("embed_tokens") is not None
                and self.base.embed_tokens._parameters.get("weight") is self.embed_weight):
            return 0
        norm_w, head_w, head_b, quant, _ = chain.head
        head = model._modules.get("lm_head")
        if quant is None and not (head._parameters.get("weight") is head_w and head._parameters.get("bias") is head_b
                                  and self.norm._parameters.get("weight") is norm_w
                                  and getattr(self.base, self.base.norm_name) is self.norm):
            return 0
        written, limit, run = 0, seqs.shape[1], GREEDY_FIRST
        while cur < limit:
            n = min(limit - cur, run)
            start = time.perf_counter()
            if pos + n > chain._capacity:
                for i in range(self.n):  # room for every position this run feeds, as DynamicCache.decode_slot makes it
                    cache._grow(i, pos + n)
                if not self._rebind(cache):
                    break
            cos, sin = self.base.rope_tables(torch.arange(pos, pos + n)[None], self.dtype)[self.window]
            if not (chain.fits(cos[:, :, :1], sin[:, :, :1], pos + n - 1) and cos.is_contiguous()
                    and sin.is_contiguous()):
                break
            got = chain.greedy(self.embed_weight, cos[0, 0], sin[0, 0], pos, int(seqs[0, cur - 1]),
                               seqs[0, cur:cur + n], eos)
            cache.length = [pos + got] * self.n
            written, cur, pos = written + got, cur + got, pos + got
            run = max(1, min(GREEDY_RUN, int(GREEDY_SECONDS * got / max(time.perf_counter() - start, 1e-9))))
            if got < n or (eos.numel() and int(seqs[0, cur - 1]) in eos.tolist()) or not self.still(cache, pos):
                break
        return written

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor, pos: int,
             attention_mask: torch.Tensor | None = None, quiet: bool = False) -> torch.Tensor | None:
        """Logits (rows, V) after feeding `input_ids` (rows, 1) as the cache's position `pos` (`cache_position`: the
        same as a (1,) tensor), with the model's `position_ids` (rows, 1) and `attention_mask` (rows, >= pos + 1;
        1 = a real token) where the batch is padded; None, having changed nothing, where the model's forward must run
        instead. `quiet`: the caller ran only loom's code since the previous step (the module docstring)."""
        cache = self.cache
        if not (quiet and self.settled and self.still(cache, pos)):
            alone = _interpreter_quiet()  # read before the check: a thread seen now may change what it reads
            if not self.unchanged(cache, pos):
                self.settled = False
                return None
            # what the step calls besides the chain is loom's code alone, read now: a hook or class added by other
            # code since the plan was built runs at every step from then on
            model = self.model
            self.settled = (alone and type(model).__module__.startswith("loom.") and _loom_leaf(self.norm)
                            and _loom_leaf(model.lm_head))
        logits = self._step(input_ids, position_ids, cache_position, pos, attention_mask)
        if logits is None:
            self.settled = False
        return logits

    def _step(self, input_ids, position_ids, cache_position, pos: int, attention_mask) -> torch.Tensor | None:
        cache, chain = self.cache, self.chain
        if input_ids.shape != (self.rows, 1):
            return None
        if not (all(map(_is, cache.keys, self.keys)) and all(map(_is, cache.values, self.values))
                or self._rebind(cache)):
            return None
        mask = length = None
        if self.static is not None:  # the whole buffer, masked, as the forward gives a static cache
            length = self.static
            if pos >= length:
                return None  # the forward raises the cache's overflow error
            mask = common.position_mask(attention_mask, cache_position, length)  # (B | 1, 1, 1, length)
            mask = mask.view(mask.shape[0], length)
        elif attention_mask is not None:  # the padded batch's keys, as `position_mask` makes them (all are causal)
            if attention_mask is not self.mask_source:
                self.mask_source, self.mask = attention_mask, attention_mask.to(torch.bool)
            mask = self.mask
        cos, sin = self.base.rope_tables(position_ids, self.dtype)[self.window]
        if pos >= chain._capacity and self.static is None:
            for i in range(self.n):  # room for this token, as DynamicCache.decode_slot makes it
                cache._grow(i, pos + 1)
            if not self._rebind(cache):
                return None
        if not chain.fits(cos, sin, pos, mask, length):
            return None
        torch.index_select(self.embed_weight, 0, input_ids.view(-1), out=self.x2d)
        out = chain.run(cos, sin, pos, mask, length)
        if self.static is None:
            cache.length = [pos + 1] * self.n
        else:
            cache.seen.fill_(pos + 1)  # as StaticCache.decode_slot counts the token
        if chain.head_in_step:
            return out  # the logits (rows, V)
        logits = self.model.finish_logits(self.model.lm_head(self.norm(out)))
        return logits[:, -1]
