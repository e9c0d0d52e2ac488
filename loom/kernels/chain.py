"""A decode chain: the batch-1..16 decode steps of a run of Llama-shaped decoder layers with one C call per layer
(csrc/decode.c `loom_decode_chain_step`) and the MLP's activation between calls in torch.

Built once per generate call by `loom.generation.decode_plan` from plain tensors, which are checked here once (the
operators' checks, `ops._layer_checks`, with the same messages) and held, so their memory stays valid. Per token
only the tensors that change are checked: the rotary tables (fresh each step) and the cache buffers (replaced when a
dynamic cache grows: `set_cache`). What a layer computes, and the rounding of every intermediate, is
loom::decode_layer_attention's, then the activation and product (torch's own ops), then loom::dense_linear's down
projection and torch's residual add: bitwise what the modules give.
"""
from __future__ import annotations

import ctypes

import torch

from loom.kernels import build, ops, policy
from loom.kernels.threads import pool_threads

_P, _L = ctypes.c_void_p, ctypes.c_long


class _Layer(ctypes.Structure):  # csrc/decode.c chain_layer
    _fields_ = [("ln1", _P), ("ln2", _P), ("w", _P * 7), ("b", _P * 7), ("kc", _P), ("vc", _P), ("a", _P),
                ("u", _P), ("hidden", _L), ("H", _L), ("Hkv", _L), ("D", _L), ("I", _L), ("c_sb", _L),
                ("c_sh", _L), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class _Step(ctypes.Structure):  # csrc/decode.c chain_step
    _fields_ = [("x", _P), ("cos", _P), ("sin", _P), ("cs_sb", _L), ("pos", _L), ("B", _L), ("L", _L), ("mask", _P),
                ("m_sb", _L), ("bf16", ctypes.c_int),
                ("threads", ctypes.c_int),
                ("no_products", ctypes.c_int)]


class LayerTensors:
    """One layer's inputs to a chain: the norms' weights, the seven projections' weights and biases (q, k, v, o,
    gate, up, down; a bias may be None), eps, the attention scale, and the activation applied in place to the gate
    projection (`act_(gate)`, e.g. torch's silu_)."""

    def __init__(self, ln1, ln2, weights, biases, eps: float, scale: float, act_) -> None:
        self.ln1, self.ln2, self.weights, self.biases = ln1, ln2, tuple(weights), tuple(biases)
        self.eps, self.scale, self.act_ = float(eps), float(scale), act_


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
        self._fn = build.library().loom_decode_chain_step
        name = str(dtype).replace("torch.", "")
        self.rows, self.dtype, self.D, self.n = rows, dtype, head_dim, len(layers)
        # the structs point into these: held as views of their own, so the memory stays valid even where a
        # parameter's `.data` is swapped (the plan notices that and stops calling the chain)
        self.layers = layers
        self._held = [t.detach() for lt in layers for t in (lt.ln1, lt.ln2, *lt.weights, *lt.biases)
                      if t is not None]
        self._structs = [_Layer() for _ in layers]
        self._acts, self._gates, self._ups = [], [], []
        hidden = None
        for i, (t, s) in enumerate(zip(layers, self._structs)):
            wq, wk, wv, wo, wg, wu, wd = t.weights
            hidden = wq.shape[1] if hidden is None else hidden
            I = wg.shape[0]
            _check(all(policy.plain(w) and w.dtype is dtype and w.is_contiguous() for w in (*t.weights, t.ln1, t.ln2))
                   and all(w.dim() == 2 for w in t.weights), f"layer {i}: weights must be contiguous {name} CPU "
                   "tensors, the projections' 2-D")
            _check(wd.shape == (hidden, I) and wu.shape == wg.shape and wg.shape[1] == hidden
                   and wo.shape[0] == hidden and wq.shape[0] % head_dim == 0 and wk.shape[0] % head_dim == 0
                   and wv.shape == wk.shape and wo.shape[1] == wq.shape[0] and t.ln1.shape == t.ln2.shape == (hidden,)
                   and wq.shape[0] // head_dim % (wk.shape[0] // head_dim) == 0 and head_dim % 2 == 0
                   and head_dim <= ops.ATTENTION_MAX_HEAD_DIM,
                   f"layer {i}: projection shapes {[tuple(w.shape) for w in t.weights]} do not form a layer of "
                   f"hidden size {hidden} and head dim {head_dim}")
            for w, b in zip(t.weights, t.biases):
                _check(b is None or (policy.plain(b) and b.dtype is dtype and b.shape == (w.shape[0],)
                                     and b.is_contiguous()), f"layer {i}: a bias does not match its weight")
            gate, up = torch.empty(rows, 1, I, dtype=dtype), torch.empty(rows, 1, I, dtype=dtype)
            self._gates.append(gate)
            self._ups.append(up)
            self._acts.append(t.act_)
            s.ln1, s.ln2 = t.ln1.data_ptr(), t.ln2.data_ptr()
            for j, (w, b) in enumerate(zip(t.weights, t.biases)):
                s.w[j], s.b[j] = w.data_ptr(), None if b is None else b.data_ptr()
            s.a, s.u = gate.data_ptr(), up.data_ptr()
            s.hidden, s.H, s.Hkv, s.D, s.I = hidden, wq.shape[0] // head_dim, wk.shape[0] // head_dim, head_dim, I
            s.eps, s.scale = t.eps, t.scale
        self.hidden = hidden
        self.x = torch.empty(rows, 1, hidden, dtype=dtype)  # the residual stream, which `run` returns
        self._step = _Step(x=self.x.data_ptr(), B=rows, bf16=int(dtype is torch.bfloat16))
        self._step_ptr = ctypes.addressof(self._step)
        self._ptrs = [ctypes.addressof(s) for s in self._structs]
        self._caches: list = [None] * self.n
        self._capacity = 0

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
        the caches; returns `self.x`. The caller checked `fits`."""
        st = self._step
        st.cos, st.sin, st.cs_sb = cos.data_ptr(), sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0
        st.mask, st.m_sb = (None, 0) if mask is None else (mask.data_ptr(),
                                                           mask.stride(0) if mask.shape[0] > 1 else 0)
        st.pos, st.L, st.threads = pos, pos + 1 if length is None else length, pool_threads()
        fn, sp, done = self._fn, self._step_ptr, None
        for p, act_, gate, up in zip(self._ptrs, self._acts, self._gates, self._ups):
            if fn(done, p, sp):
                raise MemoryError("loom decode chain: could not allocate scratch memory")
            act_(gate)
            gate.mul_(up)
            done = p
        if fn(done, None, sp):
            raise MemoryError("loom decode chain: could not allocate scratch memory")
        return self.x
