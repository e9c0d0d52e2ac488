"""A decode chain: the batch-1..16 decode steps of a run of pre-norm decoder layers, dense (Llama's MLP) or mixture
of experts, with one C call per dense layer and two per MoE layer (csrc/decode.c `loom_decode_chain_step`,
`loom_decode_chain_experts`), and between calls in torch what must round as torch does: the MLP's activation and
product, and a MoE layer's routing (softmax, top-k, normalisation).

Built once per generate call by `loom.generation.decode_plan` from plain tensors, which are checked here once (the
operators' checks, `ops._layer_checks`, with the same messages) and held, so their memory stays valid. Per token
only the tensors that change are checked: the rotary tables (fresh each step) and the cache buffers (replaced when a
dynamic cache grows: `set_cache`). What a layer computes, and the rounding of every intermediate, is
loom::decode_layer_attention's (with Qwen3's per-head q/k norms: loom::rms_norm's), then the activation and product
(torch's own ops), then loom::dense_linear's down projection and torch's residual add; a MoE layer's router is
loom::dense_linear's, its experts loom::moe_gate_up's and loom::moe_down's, its routing the module's own torch ops:
bitwise what the modules give. A projection given as `Quantized` (loom's int8, group-wise int8 or int4 weight-only
layouts) runs loom::int8_linear's, loom::int8_group_linear's or loom::int4_linear's kernel instead, its product cast
to the dtype and its bias added as the quantized module's `y + bias` rounds.
"""
from __future__ import annotations

import ctypes

import torch

from loom.kernels import build, ops, policy
from loom.kernels.threads import pool_threads

_P, _L = ctypes.c_void_p, ctypes.c_long
_F32 = torch.float32

# what F.silu(t, inplace=True) calls, without its Python wrapper (the chain's activation between two calls)
silu_ = getattr(torch._C._nn, "silu_", None) or (lambda t: torch.nn.functional.silu(t, inplace=True))
# torch runs an elementwise op as one serial loop below this many values (TensorIterator's grain), else in chunks
_TORCH_GRAIN = 32768
# torch's CPU capability -> values per step of its vector loop (two vectors), per dtype
_SILU_BLOCK = {torch.float32: {"AVX512": 32, "AVX2": 16, "DEFAULT": 0},
               torch.bfloat16: {"AVX512": 64, "AVX2": 32, "DEFAULT": 0}}
_silu_block: dict = {}


def silu_block(dtype: torch.dtype = _F32) -> int | None:
    """The `vec_block` with which loom_silu_mul (float32) or loom_silu_mul_bf16 (csrc/silu.c) computes torch's silu_
    then mul_ bitwise here, or None where it does not: torch's CPU capability must be one whose loop csrc/silu.c
    follows, and a probe must come out bitwise torch's (float32: inputs over the whole range exp and the division
    see, both loops' values, signed zeros, infinities, and past the last whole step an input where SLEEF's expf and
    libm's differ in the last bit, so a wrong loop split shows; bfloat16: every bfloat16 value but the NaNs, and a
    tail). Read once per process and dtype."""
    if dtype not in _silu_block:
        block = _SILU_BLOCK[dtype].get(torch.backends.cpu.get_cpu_capability()) if build.available() else None
        if block is not None:
            g = torch.Generator().manual_seed(0)
            if dtype is _F32:
                x = torch.cat([torch.linspace(-120, 120, 4001), torch.randn(4000, generator=g) * 6,
                               torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-30, -1e-30, 88.7, -88.7,
                                             103.9, -103.9, 104.1, -104.1, 1.999998688697815, 3.4e38])])
                x = torch.cat([x[: x.numel() // 32 * 32], torch.full((25,), -1.999998688697815)])
                fn = build.library().loom_silu_mul
            else:
                x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
                x = x[~x.isnan()]
                x = torch.cat([x, x[:61]])
                fn = build.library().loom_silu_mul_bf16
            u = (torch.rand(x.numel(), generator=g) * 4 - 2).to(dtype)
            want = silu_(x.clone()).mul_(u)
            got = x.clone()
            fn(got.data_ptr(), u.data_ptr(), got.numel(), block)
            same = got == want
            if not bool((same | (got.isnan() & want.isnan())).all()) or not torch.equal(got[same], want[same]):
                block = None
        _silu_block[dtype] = block
    return _silu_block[dtype]


class _Quant(ctypes.Structure):  # csrc/decode.c chain_quant
    _fields_ = [("kind", ctypes.c_int), ("half", ctypes.c_int), ("group", _L), ("scale", _P), ("zero", _P),
                ("tiles", _P), ("a8", ctypes.c_int)]


class _Layer(ctypes.Structure):  # csrc/decode.c chain_layer
    _fields_ = [("ln1", _P), ("ln2", _P), ("w", _P * 7), ("b", _P * 7), ("kc", _P), ("vc", _P), ("a", _P),
                ("u", _P), ("h2", _P), ("qn", _P), ("kn", _P), ("logits", _P), ("chosen", _P), ("rw", _P),
                ("sw", _P * 4), ("sb", _P * 4), ("sg", _P), ("sa", _P), ("su", _P), ("q", _P),
                ("hidden", _L), ("H", _L), ("Hkv", _L), ("D", _L), ("I", _L), ("c_sb", _L), ("c_sh", _L),
                ("E", _L), ("k", _L), ("Is", _L), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("qk_eps", ctypes.c_float), ("rw_bf16", ctypes.c_int)]


class _Step(ctypes.Structure):  # csrc/decode.c chain_step
    _fields_ = [("x", _P), ("cos", _P), ("sin", _P), ("cs_sb", _L), ("pos", _L), ("B", _L), ("L", _L), ("mask", _P),
                ("m_sb", _L), ("bf16", ctypes.c_int),
                ("threads", ctypes.c_int),
                ("no_products", ctypes.c_int), ("head", _P), ("logits", _P)]


class Routing:
    """A MoE layer's routing, as its module computes it: softmax in float32 over the router's logits, the `top_k`
    largest, divided by their sum when `normalize`, then cast to the logits' dtype when `in_logits_dtype`. A shared
    expert (Qwen2-MoE), where there is one: `shared` holds the weights of its gate (1, hidden) and of its gate, up
    and down projections, `shared_biases` theirs (or None), `shared_act_` its activation in place; the block adds
    sigmoid(gate) * down(act(gate_proj) * up) to the routed sum."""

    def __init__(self, top_k: int, normalize: bool, in_logits_dtype: bool, shared=None, shared_biases=None,
                 shared_act_=None) -> None:
        self.top_k, self.normalize, self.in_logits_dtype = int(top_k), bool(normalize), bool(in_logits_dtype)
        self.shared = None if shared is None else tuple(shared)
        self.shared_biases = (None,) * 4 if shared_biases is None else tuple(shared_biases)
        self.shared_act_ = shared_act_


class Quantized:
    """A projection's weight as one of loom's weight-only quantized Linears holds it, run through the kernel its
    module's operator calls: `kind` "int8" (weight int8 (N, K), `scale` float32 (N,): loom::int8_linear), "int8_group"
    (int8 (N, K), `scale` float16/float32 (N, K / group): loom::int8_group_linear) or "int4" (uint8 (N, K / 2) two
    nibbles a byte, `scale` and `zero` (or None: symmetric, zero 8) float16/float32 (N, K / group):
    loom::int4_linear; `tiles`: the module's copy in ops.int4_a8_tiles' layout, which its decode-size products read,
    or None; `a8`: with tiles, 8-bit activations as loom::int4_linear_a8 computes them). The product is the
    operator's (float32, cast to the layer's dtype), then the bias added as the module's `y + bias` does."""

    KINDS = {"int8": 1, "int8_group": 2, "int4": 3}

    def __init__(self, kind: str, scale: torch.Tensor, zero: torch.Tensor | None = None, group: int = 0,
                 tiles: torch.Tensor | None = None, a8: bool = False) -> None:
        self.kind, self.scale, self.zero, self.group, self.tiles = kind, scale, zero, int(group), tiles
        self.a8 = bool(a8)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.scale, self.zero, self.tiles) if t is not None]

    def shape(self, weight: torch.Tensor) -> tuple[int, int]:
        """The (N, K) product the weight computes."""
        return (weight.shape[0], weight.shape[1] * 2) if self.kind == "int4" else tuple(weight.shape)

    def check(self, weight: torch.Tensor) -> bool:
        """Whether the tensors are what the kernel reads (the operators' checks, contiguous CPU memory)."""
        ts = [weight, *self.tensors()]
        if not (self.kind in self.KINDS and weight.dim() == 2 and all(policy.plain(t) and t.is_contiguous()
                                                                      for t in ts)):
            return False
        n, k = self.shape(weight)
        s = self.scale
        if self.kind == "int8":
            return weight.dtype is torch.int8 and s.dtype is _F32 and s.shape == (n,) and self.zero is None
        groups_ok = (self.group > 0 and self.group % 16 == 0 and k % self.group == 0
                     and s.dtype in (torch.float16, _F32) and s.shape == (n, k // self.group))
        if self.kind == "int8_group":
            return (groups_ok and weight.dtype is torch.int8 and self.group <= policy.INT8_GROUP_MAX
                    and self.zero is None)
        return (groups_ok and weight.dtype is torch.uint8
                and (self.zero is None or (self.zero.dtype is s.dtype and self.zero.shape == s.shape))
                and (not self.a8 or self.tiles is not None)
                and (self.tiles is None or (self.group % 32 == 0 and self.tiles.dtype is torch.uint8
                                            and self.tiles.dim() == 1 and self.tiles.numel()
                                            == ops.int4_a8_tile_bytes(weight, s, self.zero))))


class LayerTensors:
    """One layer's inputs to a chain: the norms' weights, the seven projections' weights and biases (q, k, v, o,
    gate, up, down; a bias may be None), eps, the attention scale, and the activation applied in place to the gate
    projection (`act_(gate)`, e.g. torch's silu_). A MoE layer (`routing` given) has as its last three weights the
    router's (E, hidden), the experts' packed gate and up projections (E, 2I, hidden) and down projections
    (E, hidden, I), without biases. `q_norm` / `k_norm` (with `qk_eps`): per-head RMSNorm weights of the queries and
    keys before RoPE (Qwen3), or None. `quant`: per projection None (a weight in the layer's dtype) or `Quantized`
    (q, k, v, o, and a dense layer's gate, up and down projections)."""

    def __init__(self, ln1, ln2, weights, biases, eps: float, scale: float, act_, routing: Routing | None = None,
                 q_norm=None, k_norm=None, qk_eps: float = 0.0, quant=None) -> None:
        self.ln1, self.ln2, self.weights, self.biases = ln1, ln2, tuple(weights), tuple(biases)
        self.eps, self.scale, self.act_ = float(eps), float(scale), act_
        self.routing, self.q_norm, self.k_norm, self.qk_eps = routing, q_norm, k_norm, float(qk_eps)
        self.quant = (None,) * 7 if quant is None else tuple(quant) + (None,) * (7 - len(quant))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the chain reads through a pointer."""
        shared = () if self.routing is None or self.routing.shared is None else (*self.routing.shared,
                                                                                  *self.routing.shared_biases)
        quant = [t for q in self.quant if q is not None for t in q.tensors()]
        return [t for t in (self.ln1, self.ln2, *self.weights, *self.biases, self.q_norm, self.k_norm, *shared,
                            *quant) if t is not None]

    def float_tensors(self) -> list[torch.Tensor]:
        """The tensors the chain reads in the layer's dtype (all but quantized weights and their scales)."""
        quantized = {id(t) for w, q in zip(self.weights, self.quant) if q is not None for t in (w, *q.tensors())}
        return [t for t in self.tensors() if id(t) not in quantized]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"loom decode chain: {message}")


class DecodeChain:
    """The decode steps of `layers` (LayerTensors) for `rows` rows of `dtype` over per-layer caches of head_dim
    `head_dim` (`set_cache` before the first `run`)."""

    def __init__(self, layers: list[LayerTensors], rows: int, dtype: torch.dtype, head_dim: int) -> None:
        _check(build.available(), "needs loom's C kernels (they are off or not built here)")
        _check(dtype in policy.DTYPES, f"dtype {dtype} is not one of float32, bfloat16")
        _check(0 < rows <= policy.MAX_ROWS, f"rows={rows} must be 1..{policy.MAX_ROWS}")
        lib = build.library()
        self._fn, self._experts = lib.loom_decode_chain_step, lib.loom_decode_chain_experts
        self._layers_fn = lib.loom_decode_chain_layers
        self.rows, self.dtype, self.D, self.n = rows, dtype, head_dim, len(layers)
        # the structs point into these: held as views of their own, so the memory stays valid even where a
        # parameter's `.data` is swapped (the plan notices that and stops calling the chain)
        self.layers = layers
        self._held = [t.detach() for lt in layers for t in lt.tensors()]
        self._quant = []  # the layers' chain_quant arrays (their structs point at them)
        self._structs = [_Layer() for _ in layers]
        self._runs = []  # per layer: (struct address, activation, its two inputs, MoE routing buffers or None)
        w0, q0 = (layers[0].weights[0], layers[0].quant[0]) if layers else (None, None)
        self.hidden = 0 if not layers else (w0.shape if q0 is None else q0.shape(w0))[1]
        for i, (t, s) in enumerate(zip(layers, self._structs)):
            self._runs.append((ctypes.addressof(s), t.act_, *self._describe(i, t, s, rows, dtype, head_dim)))
        # dense layers with SiLU (float32 or bfloat16): runs of greedy steps in one call (`greedy`), every layer's
        # activation and product in C with torch's bits (csrc/silu.c); for (rows, I) of the grain's size or more,
        # only while torch's silu_ would run them in one loop too (one thread)
        self._fused = None
        if (layers and all(t.routing is None and t.act_ is silu_ for t in layers)
                and silu_block(dtype) is not None):
            self._fused = ((_P * self.n)(*(r[0] for r in self._runs)), silu_block(dtype))
            self._fused_serial = rows * max(r[2].shape[-1] for r in self._runs) < _TORCH_GRAIN
        self.x = torch.empty(rows, 1, self.hidden, dtype=dtype)  # the residual stream, which `run` returns
        self._step = _Step(x=self.x.data_ptr(), B=rows, bf16=int(dtype is torch.bfloat16))
        self._step_ptr = ctypes.addressof(self._step)
        self._caches: list = [None] * self.n
        self._capacity = 0
        self.head = None  # (norm weight, head weight, bias, Quantized or None, vocabulary): set_head
        self.head_in_step = False

    def set_head(self, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                 quant: Quantized | None = None, in_step: bool = True) -> None:
        """Have `run` finish with the model's final RMSNorm (`norm_weight`, `eps`) and head (`weight` (V, hidden) in
        the dtype, or `quant`'s layout; `bias` (V,) or None) and return the logits (rows, V) in the dtype, a new
        tensor each step: bitwise what the modules give (loom::rms_norm, then the head's operator). `greedy` always
        runs them; with in_step=False `run` leaves them to the caller's module calls."""
        hidden, name = self.hidden, str(self.dtype).replace("torch.", "")
        _check(weight.dim() == 2 and (quant is None or quant.check(weight)),
               "the head's weight, scales or zero points are not what its kernel reads")
        V, K = weight.shape if quant is None else quant.shape(weight)
        floats = [norm_weight] + ([weight] if quant is None else []) + ([bias] if bias is not None else [])
        _check(K == hidden and norm_weight.shape == (hidden,) and (bias is None or bias.shape == (V,))
               and all(policy.plain(t) and t.dtype is self.dtype and t.is_contiguous() for t in floats),
               f"the final norm {tuple(norm_weight.shape)} and head {tuple(weight.shape)} must be contiguous {name} "
               f"CPU tensors over hidden size {hidden}")
        layer = _Layer(ln1=norm_weight.data_ptr(), hidden=hidden, I=V, eps=float(eps))
        layer.w[0], layer.b[0] = weight.data_ptr(), None if bias is None else bias.data_ptr()
        if quant is not None:
            self._point_quant(layer, [quant])
        self._head_struct = layer
        self.head = (norm_weight, weight, bias, quant, V)
        self._held += [t.detach() for t in self.head_tensors()]
        self.head_in_step = in_step
        self._step.head = ctypes.addressof(layer) if in_step else None

    def _point_quant(self, s: _Layer, quant) -> None:
        """Point struct `s` at a chain_quant array describing its projections' `quant` (Quantized or None each, in
        projection order), held with the chain."""
        array = (_Quant * 7)()
        for slot, q in zip(array, quant):
            if q is not None:
                slot.kind, slot.half = Quantized.KINDS[q.kind], int(q.scale.dtype is torch.float16)
                slot.group, slot.scale = q.group, q.scale.data_ptr()
                slot.zero = None if q.zero is None else q.zero.data_ptr()
                slot.tiles = None if q.tiles is None else q.tiles.data_ptr()
                slot.a8 = int(q.a8)
        self._quant.append(array)
        s.q = ctypes.addressof(array)

    def head_tensors(self) -> list[torch.Tensor]:
        """The tensors the head reads through a pointer (none without a head)."""
        if self.head is None:
            return []
        norm_weight, weight, bias, quant, _ = self.head
        return [t for t in (norm_weight, weight, bias, *(quant.tensors() if quant else ())) if t is not None]

    def _describe(self, i: int, t: LayerTensors, s: _Layer, rows: int, dtype: torch.dtype, D: int):
        """Check layer `i`'s tensors, fill its struct and allocate its buffers; (the activation's two inputs, the MoE
        routing buffers or None)."""
        hidden, name = self.hidden, str(dtype).replace("torch.", "")
        moe = t.routing
        _check(all(q is None or (j < (4 if moe is not None else 7) and q.check(w))
                   for j, (w, q) in enumerate(zip(t.weights, t.quant))),
               f"layer {i}: a quantized projection's weight, scales or zero points are not what its kernel reads "
               "(contiguous CPU tensors of the quantized Linear's layout; a MoE layer's router and experts plain)")
        # the (N, K) each projection computes (a packed int4 weight holds K / 2 bytes a row)
        wq, wk, wv, wo, wg, wu, wd = (w if q is None else torch.empty(q.shape(w), device="meta")
                                      for w, q in zip(t.weights, t.quant))
        _check(all(policy.plain(w) and w.dtype is dtype and w.is_contiguous() for w in t.float_tensors())
               and all(w.dim() == (3 if moe is not None and j > 4 else 2) for j, w in enumerate(t.weights)),
               f"layer {i}: weights must be contiguous {name} CPU tensors, the projections' 2-D (a MoE layer's "
               "packed experts 3-D)")
        if moe is None:
            I = wg.shape[0]
            mlp_ok = wd.shape == (hidden, I) and wu.shape == wg.shape and wg.shape[1] == hidden
        else:
            E, I = wg.shape[0], wd.shape[2]
            mlp_ok = (wg.shape == (E, hidden) and wu.shape == (E, 2 * I, hidden) and wd.shape == (E, hidden, I)
                      and 0 < moe.top_k <= E and all(b is None for b in t.biases[4:]))
            if moe.shared is not None:
                sg, sgp, sup, sdp = moe.shared
                Is = sgp.shape[0]
                mlp_ok = (mlp_ok and moe.shared_act_ is not None and sg.shape == (1, hidden)
                          and sgp.shape == sup.shape == (Is, hidden) and sdp.shape == (hidden, Is)
                          and all(b is None or (b.dim() == 1 and b.shape[0] == w.shape[0])
                                  for w, b in zip(moe.shared, moe.shared_biases)))
        Hq, Hkv = wq.shape[0] // D, wk.shape[0] // D
        _check(mlp_ok and wo.shape[0] == hidden and wq.shape[1] == hidden and wq.shape[0] % D == 0
               and wk.shape[0] % D == 0 and wv.shape == wk.shape and wk.shape[1] == hidden
               and wo.shape[1] == wq.shape[0]
               and t.ln1.shape == t.ln2.shape == (hidden,) and Hkv > 0 and Hq % Hkv == 0 and D % 2 == 0
               and D <= ops.ATTENTION_MAX_HEAD_DIM
               and all(n is None or n.shape == (D,) for n in (t.q_norm, t.k_norm)),
               f"layer {i}: projection shapes {[tuple(w.shape) for w in t.weights]} do not form a layer of "
               f"hidden size {hidden} and head dim {D}")
        for w, b in zip(t.weights, t.biases):
            _check(b is None or (policy.plain(b) and b.dtype is dtype and b.shape == (w.shape[0],)
                                 and b.is_contiguous()), f"layer {i}: a bias does not match its weight")
        s.ln1, s.ln2 = t.ln1.data_ptr(), t.ln2.data_ptr()
        for j, (w, b) in enumerate(zip(t.weights, t.biases)):
            s.w[j], s.b[j] = w.data_ptr(), None if b is None else b.data_ptr()
        if any(q is not None for q in t.quant):
            self._point_quant(s, t.quant)
        s.qn = None if t.q_norm is None else t.q_norm.data_ptr()
        s.kn = None if t.k_norm is None else t.k_norm.data_ptr()
        s.hidden, s.H, s.Hkv, s.D, s.I = hidden, Hq, Hkv, D, I
        s.eps, s.scale, s.qk_eps = t.eps, t.scale, t.qk_eps
        h2 = torch.empty(rows, hidden, dtype=dtype)
        s.h2 = h2.data_ptr()
        if moe is None:
            gate, up = torch.empty(rows, 1, I, dtype=dtype), torch.empty(rows, 1, I, dtype=dtype)
            s.a, s.u = gate.data_ptr(), up.data_ptr()
            self._held += [h2, gate, up]
            return gate, up, None
        k = moe.top_k
        gate_up, act = torch.empty(rows * k, 2 * I, dtype=dtype), torch.empty(rows * k, I, dtype=dtype)
        logits, chosen = torch.empty(rows, E, dtype=dtype), torch.empty(rows, k, dtype=torch.int64)
        probs = torch.empty(rows, k, dtype=torch.float32)
        rw = torch.empty(rows, k, dtype=dtype) if moe.in_logits_dtype and dtype is not torch.float32 else probs
        s.a, s.u, s.logits, s.chosen, s.rw = (gate_up.data_ptr(), act.data_ptr(), logits.data_ptr(),
                                              chosen.data_ptr(), rw.data_ptr())
        s.E, s.k, s.rw_bf16 = E, k, int(rw.dtype is torch.bfloat16)
        self._held += [h2, gate_up, act, logits, chosen, probs, rw]
        shared = None
        if moe.shared is not None:
            Is = moe.shared[1].shape[0]
            shared = (torch.empty(rows, 1, dtype=dtype), torch.empty(rows, Is, dtype=dtype),
                      torch.empty(rows, Is, dtype=dtype), moe.shared_act_)
            for j, (w, b) in enumerate(zip(moe.shared, moe.shared_biases)):
                s.sw[j], s.sb[j] = w.data_ptr(), None if b is None else b.data_ptr()
            s.sg, s.sa, s.su, s.Is = shared[0].data_ptr(), shared[1].data_ptr(), shared[2].data_ptr(), Is
            self._held += list(shared[:3])
        return gate_up[:, :I], gate_up[:, I:], (logits, probs, chosen, rw, k, moe.normalize, act, shared)

    def set_cache(self, i: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Point layer `i` at its (rows, Hkv, capacity, D) key and value buffers (held until replaced)."""
        s, kc, vc = self._structs[i], k_cache, v_cache
        _check(policy.plain(kc) and policy.plain(vc) and kc.dtype is self.dtype and vc.dtype is self.dtype
               and kc.dim() == 4 and kc.shape == vc.shape and kc.stride() == vc.stride()
               and kc.shape[:2] == (self.rows, s.Hkv) and kc.shape[3] == self.D and kc.stride(3) == 1
               and kc.stride(2) == self.D, f"layer {i}: cache buffers {tuple(kc.shape)} / {tuple(vc.shape)} must be "
               f"({self.rows}, {s.Hkv}, capacity, {self.D}) {str(self.dtype).replace('torch.', '')} with contiguous "
               "positions")
        s.kc, s.vc, s.c_sb, s.c_sh = kc.data_ptr(), vc.data_ptr(), kc.stride(0), kc.stride(1)
        self._caches[i] = (kc.detach(), vc.detach())
        self._capacity = min(c[0].shape[2] for c in self._caches) if all(self._caches) else 0

    def fits(self, cos: torch.Tensor, sin: torch.Tensor, pos: int, mask: torch.Tensor | None = None,
             length: int | None = None) -> bool:
        """Whether this step's rotary tables ((rows or 1, 1, 1, D) in the chain's dtype), position, attended length
        (None: pos + 1) and mask (None, or (rows or 1, >= length) bools, True = attend, unit stride along the keys)
        fit."""
        cs, length = cos.shape, pos + 1 if length is None else length
        return (policy.plain(cos) and policy.plain(sin) and cos.dtype is self.dtype and sin.dtype is self.dtype
                and len(cs) == 4 and sin.shape == cs and cs[0] in (1, self.rows) and cs[1] == cs[2] == 1
                and cs[3] == self.D and cos.stride() == sin.stride() and cos.stride(3) == 1
                and 0 <= pos < length <= self._capacity
                and (mask is None or (policy.plain(mask) and mask.dtype is torch.bool and mask.dim() == 2
                                      and mask.shape[0] in (1, self.rows) and mask.shape[1] >= length
                                      and mask.stride(1) == 1)))

    def run(self, cos: torch.Tensor, sin: torch.Tensor, pos: int, mask: torch.Tensor | None = None,
            length: int | None = None) -> torch.Tensor:
        """The layers' decode step on `self.x` (the caller wrote the token embeddings there) for the token at `pos`,
        attending to the keys 0..length-1 (default pos + 1) where `mask` says so, writing its keys and values into
        the caches; returns `self.x`, or with a head (`set_head`) the logits (rows, V). The caller checked `fits`."""
        st = self._step
        st.cos, st.sin, st.cs_sb = cos.data_ptr(), sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0
        st.mask, st.m_sb = (None, 0) if mask is None else (mask.data_ptr(),
                                                           mask.stride(0) if mask.shape[0] > 1 else 0)
        st.pos, st.L, st.threads = pos, pos + 1 if length is None else length, pool_threads()
        fn, sp, done = self._fn, self._step_ptr, None
        for p, act_, a, b, moe in self._runs:
            if fn(done, p, sp):
                raise MemoryError("loom decode chain: could not allocate scratch memory")
            if moe is None:
                act_(a)
                a.mul_(b)
            else:  # route as the module does, then the routed experts' gate and up projections
                logits, probs, chosen, rw, k, normalize, act, shared = moe
                torch.topk(torch.softmax(logits, -1, dtype=_F32), k, -1, out=(probs, chosen))
                if normalize:
                    probs.div_(probs.sum(-1, keepdim=True))
                if rw is not probs:
                    rw.copy_(probs)
                if shared is not None:  # the shared expert's gate and activation, for the next call
                    gate, sa, su, shared_act_ = shared
                    gate.sigmoid_()
                    shared_act_(sa)
                    sa.mul_(su)
                if self._experts(p, sp):
                    raise MemoryError("loom decode chain: could not allocate scratch memory")
                act_(a)
                torch.mul(a, b, out=act)
            done = p
        logits = None
        if self.head_in_step:  # a new tensor each step: a caller may keep every step's logits
            logits = torch.empty(self.rows, self.head[4], dtype=self.dtype)
            self._step.logits = logits.data_ptr()
        if fn(done, None, sp):
            raise MemoryError("loom decode chain: could not allocate scratch memory")
        return self.x if logits is None else logits

    def greedy_fits(self, embed: torch.Tensor) -> bool:
        """Whether `greedy` runs here: dense SiLU layers (`_fused`), one row, a head set, an embedding table of
        rows of the hidden size in the chain's dtype, and the activation in one torch loop (see `_fused`)."""
        return (self._fused is not None and self.rows == 1 and self.head is not None and embed.dtype is self.dtype
                and embed.dim() == 2 and embed.shape[1] == self.hidden and embed.is_contiguous() and policy.plain(embed)
                and (self._fused_serial or torch.get_num_threads() == 1))

    def greedy(self, embed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, first: int,
               out: torch.Tensor, eos: torch.Tensor) -> int:
        """Greedy decoding of the one row for up to out.numel() tokens in one C call (csrc/decode.c
        loom_decode_chain_greedy): feed `first` at `pos`, then each token picked (the head's first maximal logit, as
        torch.argmax) at the next position, until a token in `eos` (int64, maybe empty) or `out` (int64, contiguous)
        is full. `cos` / `sin`: (steps, D) rotary rows in the dtype for positions pos.., unit stride along D. The
        caches must hold pos + out.numel() positions (set_cache). Returns the tokens written. Raises ValueError for
        arguments that do not fit (named), IndexError for a token outside the embedding's rows."""
        steps = out.numel()
        _check(self.greedy_fits(embed), "greedy needs dense SiLU layers, one row, a head and an embedding table of "
               f"{self.dtype} rows of the hidden size {self.hidden} (greedy_fits)")
        _check(all(policy.plain(t) and t.dtype is torch.int64 and t.dim() == 1 and t.is_contiguous()
                   for t in (out, eos)), "greedy's out and eos must be contiguous 1-D int64 CPU tensors")
        _check(all(policy.plain(t) and t.dtype is self.dtype and t.shape == (steps, self.D) and t.stride(1) == 1
                   and t.stride(0) == cos.stride(0) for t in (cos, sin)),
               f"greedy's cos and sin must be ({steps}, {self.D}) {self.dtype} CPU tensors with unit stride along D")
        _check(0 <= pos and pos + steps <= self._capacity, f"greedy: positions {pos}..{pos + steps - 1} do not fit "
               f"the caches' {self._capacity} (set_cache)")
        st = self._step
        st.mask, st.m_sb, st.cs_sb, st.threads, st.pos = None, 0, 0, pool_threads(), pos
        logits = torch.empty(1, self.head[4], dtype=self.dtype)
        st.logits, st.head = logits.data_ptr(), ctypes.addressof(self._head_struct)
        try:
            got = build.library().loom_decode_chain_greedy(
                self._fused[0], self.n, self._step_ptr, self._fused[1], embed.data_ptr(), embed.shape[0],
                cos.data_ptr(), sin.data_ptr(), cos.stride(0), int(first), out.data_ptr(), steps, eos.data_ptr(),
                eos.numel())
        finally:
            st.head = ctypes.addressof(self._head_struct) if self.head_in_step else None
        if got == -3:
            raise IndexError(f"loom decode chain: a token id is outside the embedding's {embed.shape[0]} rows")
        if got < 0:
            raise MemoryError("loom decode chain: could not allocate scratch memory")
        return got
