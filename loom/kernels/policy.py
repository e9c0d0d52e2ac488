"""When a kernel applies: the one place that knows the row limits, the dtypes, the bf16 rule and which tensors may
reach the C kernels. Models, generation and quantization ask here instead of keeping their own guard lists.

Measured on the project's AVX2 machine (bench/bench_generate.py prints the floors):
- up to MAX_ROWS activation rows (decode), loom's kernels stream each weight once at close to memory bandwidth:
  1.5x F.linear at 1 row, 2-4x at 2-16 rows; above that a blocked float GEMM wins, except for int8 and int4 weights,
  whose own blocked integer GEMMs beat dequantizing (int8_applies, int4_applies; any grad mode: the ops have autograd);
- bf16 beyond one row where torch emulates bf16 (AVX2 or less), or where the kernel has AVX-512 BF16 (the
  x86-64-v4-vnni level): on a Zen 4 machine (1 thread, CPU time, bench shapes, interleaved with F.linear on other
  weight copies) 8 bf16 rows took 94/320/252/6175 us for the 768x768/2048x768/768x2048/50257x768 weights against
  torch's 197/512/412/11258 us (1.6-2.1x). With AMX, torch's own bf16 matmul was faster at 8 rows on an Intel
  machine; AMX CPUs have AVX-512 BF16 too, so this is worth re-measuring there.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.kernels import build

MAX_ROWS = 16  # activation rows up to which the decode-size kernels (dense, int8, int4) beat torch's GEMM
DTYPES = (torch.float32, torch.bfloat16)
# torch's bf16 matmul is emulated (~5x slower than fp32) on CPUs without bf16 instructions
EMULATED_BF16 = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2")

enabled = build.available
BATCHED_BF16_LEVELS = ("x86-64-v4-vnni",)  # kernel levels whose bf16 product beats torch's at 2-16 rows


def batched_bf16() -> bool:
    """Whether bf16 products of 2-16 rows go to loom's kernel (see the module docstring)."""
    return EMULATED_BF16 or build.level() in BATCHED_BF16_LEVELS


_PLAIN = (torch.Tensor, nn.Parameter)


def plain(t: torch.Tensor) -> bool:
    """A CPU tensor of torch's own type: no DTensor, FakeTensor, functional or other wrapper subclass (layouts and
    the rest are checked by the operators themselves)."""
    return type(t) in _PLAIN and t.is_cpu


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def fp32_gemm() -> bool:
    """Whether the kernel level in use has loom's blocked fp32 GEMM for more rows than decode sizes (AVX-512:
    csrc/dense.c, about 2x torch's MKL sgemm on AMD CPUs and closer to the float64 product); elsewhere torch's GEMM
    computes them."""
    return build.has("loom_dense_blocked")


FP32_GEMM_MIN_ROWS = 32  # below, and below 2^20 multiply-adds, packing the weight costs more than it saves


def fp32_gemm_takes(rows: int, n: int, k: int) -> bool:
    """Whether a fp32 product of `rows` rows with an (n, k) weight goes to the blocked fp32 GEMM (more rows than
    decode sizes). Measured on one thread against MKL: 17 x 768 x 768 1.00x, 64 x 128 x 128 1.17x, 128 x 384 x 384
    1.77x, 512 x 768 x 768 2.2x."""
    return rows >= FP32_GEMM_MIN_ROWS and rows * n * k >= (1 << 20) and fp32_gemm()


def dense_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a Linear's product on `x` goes to loom::dense_linear (inference: decode-sized fp32/bf16, and fp32 at
    any row count where the level has the blocked fp32 GEMM)."""
    if torch.is_grad_enabled() or not enabled():
        return False
    if not (plain(x) and plain(weight) and (bias is None or plain(bias))):
        return False
    dtype = x.dtype
    if weight.dtype is not dtype or dtype not in DTYPES or (bias is not None and bias.dtype is not dtype):
        return False
    rows = rows_of(x)
    if rows > MAX_ROWS:
        return dtype is torch.float32 and weight.dim() == 2 and fp32_gemm_takes(rows, *weight.shape)
    return 0 < rows and (rows == 1 or dtype is torch.float32 or batched_bf16())


def moe_applies(x: torch.Tensor) -> bool:
    """Whether a mixture-of-experts block's routed products on (tokens, hidden) `x` go to loom::moe_gate_up and
    loom::moe_down: where every expert's product would go to loom::dense_linear (`dense_applies`), so the result is
    the modules' own, bitwise."""
    if torch.is_grad_enabled() or not enabled() or not plain(x):
        return False
    rows, dtype = rows_of(x), x.dtype
    return dtype in DTYPES and 0 < rows <= MAX_ROWS and (rows == 1 or dtype is torch.float32 or batched_bf16())


def norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() and x.dtype in DTYPES and weight.dtype is x.dtype and plain(x)
            and plain(weight) and enabled())


def attention_applies(q, k, v, mask, is_causal: bool, dropout: float) -> bool:
    """A decode step's attention: one query per head, no dropout or causal flag, a bool (B|1, 1, 1, L) mask."""
    qs = q.shape
    if is_causal or dropout or len(qs) != 4 or qs[2] != 1 or torch.is_grad_enabled() or not enabled():
        return False
    dtype, ks = q.dtype, k.shape
    if not (dtype in DTYPES and k.dtype is dtype and v.dtype is dtype and plain(q) and plain(k) and plain(v)):
        return False
    if not (len(ks) == 4 and qs[3] == ks[3] <= 512 and v.shape == ks and ks[1] and qs[1] % ks[1] == 0 and ks[2]):
        return False
    return mask is None or (plain(mask) and mask.dtype is torch.bool and mask.dim() == 4
                            and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[0] in (1, qs[0])
                            and mask.shape[3] == ks[2])


def flash_applies(q, k, v, mask, is_causal: bool, dropout: float) -> bool:
    """Attention over whole sequences (loom::flash_attention): training (a gradient wanted for q, k or v), and
    inference over 2+ queries (a prefill; a single query is loom::decode_attention's). No mask (causal or not), no
    dropout, plain CPU fp32/bf16 (B, H, T, D) and (B, Hkv, S, D) with D <= 256. At the LoRA benchmark's shapes (T 256,
    D 64, 12/4 heads, bf16) its forward + backward took 16 ms against SDPA's 43 ms; a 512-token prefill (12/4 heads,
    D 64) 8.0 / 4.1 ms per layer in fp32 / bf16 against SDPA's 10.3 / 13.9 ms (1 thread)."""
    if mask is not None or dropout or not enabled():
        return False
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)) \
            and (q.dim() != 4 or q.shape[2] < 2):
        return False
    dtype, qs, ks = q.dtype, q.shape, k.shape
    if not (dtype in DTYPES and k.dtype is dtype and v.dtype is dtype and plain(q) and plain(k) and plain(v)):
        return False
    return (len(qs) == 4 and len(ks) == 4 and v.shape == ks and ks[0] == qs[0] and ks[3] == qs[3]
            and 0 < qs[3] <= 256 and ks[1] > 0 and qs[1] % ks[1] == 0 and ks[2] > 0 and qs[2] > 0)


def padded_flash_applies(q, k, v, mask, is_causal: bool, dropout: float) -> bool:
    """An encoder's attention over a padded batch without autograd (loom::flash_attention with key counts, which the
    caller still has to read from the mask: `models.common.key_lengths`): a bool (B | 1, 1, T | 1, S) mask, not
    causal, no dropout, what flash_applies takes otherwise. Padding keys are skipped, not masked: at MiniLM's shapes
    (32 texts, 12 heads, head dim 32, 30-120 tokens, fp32) 1.3-3x faster than SDPA with the mask (1 thread)."""
    if (mask is None or is_causal or dropout or not enabled() or mask.dtype is not torch.bool or mask.dim() != 4
            or not plain(mask) or torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            or torch.is_autocast_enabled("cpu")):
        return False
    ms, qs = mask.shape, q.shape
    return (q.dim() == 4 and qs[2] >= 2 and ms[0] in (1, qs[0]) and ms[1] == 1 and ms[2] in (1, qs[2])
            and k.dim() == 4 and ms[3] == k.shape[2] and flash_applies(q, k, v, None, False, 0.0))


def rope_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotary embedding of (B, H, T, D) `x` over its whole head dim (loom::rope, bitwise apply_rotary's torch ops in
    every fp32/bf16 combination, forward and backward): plain CPU tensors, cos/sin (B|1, 1, T, D)."""
    if not (x.dtype in DTYPES and cos.dtype in DTYPES and sin.dtype is cos.dtype and plain(x) and plain(cos)
            and plain(sin) and enabled()) or cos.requires_grad or sin.requires_grad:
        return False
    xs, cs = x.shape, cos.shape
    return (len(xs) == 4 and len(cs) == 4 and sin.shape == cs and xs[3] % 2 == 0 and cs[0] in (1, xs[0])
            and cs[1] == 1 and cs[2] == xs[2] and cs[3] == xs[3])


def int8_applies(x: torch.Tensor) -> bool:
    """Whether a loom int8 Linear's product on `x` goes to loom::int8_linear: at any row count, since above MAX_ROWS
    its blocked GEMM (csrc/int8.c) beat dequantizing to fp32 + F.linear 1.6-3x at 128-512 rows, at every level."""
    return plain(x) and x.is_floating_point() and enabled()


INT8_GROUP_MAX = 512  # csrc/int8g.c INT8G_MAX_G: a group's exact int32 sum fits up to here


def int8_group_applies(x: torch.Tensor, group_size: int) -> bool:
    """Whether a loom group-wise int8 Linear (GGUF Q8_0) on `x` goes to loom::int8_group_linear: any plain CPU float
    input at any row count. Its decode kernel streams the weight once; more rows run the same kernel over chunks of
    64 activation rows (so a row's result never depends on the batch). Where the C kernels are off the operator
    takes its torch path, which computes the same bits (slower: float64 batched products of 8 groups at a time)."""
    return plain(x) and x.is_floating_point() and int8_group_takes(group_size)


def int8_group_takes(group_size: int) -> bool:
    """Whether loom::int8_group_linear's kernel takes this group size (at any row count)."""
    return group_size % 16 == 0 and 0 < group_size <= INT8_GROUP_MAX


INT4_GEMM_MAX_GROUP = 4096  # csrc/int4.c INT4_GEMM_MAX_G: the blocked int4 GEMM's int32 group sums fit up to here


def int4_applies(x: torch.Tensor, group_size: int) -> bool:
    """Whether a loom int4 Linear's product on `x` goes to loom::int4_linear: at decode sizes as int8's does, and
    for more rows (prefill) where its blocked GEMM takes the group size (a multiple of 32, at most
    INT4_GEMM_MAX_GROUP). That GEMM never dequantizes the whole weight: 1.3-3x faster than dequantizing it to fp32
    and calling torch's GEMM (the path larger rows took before, and still take for other group sizes)."""
    if not (plain(x) and x.is_floating_point() and enabled()):
        return False
    return rows_of(x) <= MAX_ROWS or int4_gemm_takes(group_size)


def int4_gemm_takes(group_size: int) -> bool:
    """Whether loom::int4_linear's blocked GEMM (more rows than decode sizes) takes this group size."""
    return group_size % 32 == 0 and group_size <= INT4_GEMM_MAX_GROUP


def rope_attention_applies(q, k, v, cos, sin, mask) -> bool:
    """A decode step's RoPE + cache write + attention in one kernel (loom::rope_cache_attention): one new token,
    (B, 1, heads, D) projections with contiguous heads, full-width (B|1, 1, 1, D) cos/sin in their dtype, and a mask
    `attention_applies` would take (its length is checked against the cache by the operator)."""
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or qs[1] != 1 or torch.is_grad_enabled() or not enabled():
        return False
    dtype, D = q.dtype, qs[3]
    if not (dtype in DTYPES and k.dtype is dtype and v.dtype is dtype and cos.dtype is dtype and sin.dtype is dtype
            and plain(q) and plain(k) and plain(v) and plain(cos) and plain(sin)):
        return False
    if not (len(ks) == 4 and v.shape == ks and ks[0] == qs[0] and ks[1] == 1 and ks[3] == D and D % 2 == 0
            and D <= 512 and ks[2] and qs[2] % ks[2] == 0 and cos.shape == sin.shape and len(cos.shape) == 4
            and cos.shape[1:] == (1, 1, D) and cos.shape[0] in (1, qs[0]) and cos.stride() == sin.stride()
            and cos.stride(-1) == 1):
        return False
    if not all(t.stride(-1) == 1 and t.stride(-2) == D for t in (q, k, v)):
        return False
    return mask is None or (plain(mask) and mask.dtype is torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                            and mask.shape[2] == 1 and mask.shape[0] in (1, qs[0]) and mask.stride(-1) == 1)


def loss_applies(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether a token cross entropy over (..., vocabulary) `logits` goes to loom::token_nll: plain CPU fp32 or bf16
    logits (any grad mode: the operator has autograd). It reads the logits in their own dtype instead of torch's
    fp32 copy, log_softmax tensor and five passes over (rows, vocabulary)."""
    return (logits.dtype in DTYPES and logits.dim() >= 1 and logits.shape[-1] > 0 and plain(logits)
            and plain(labels) and enabled())


def argmax_applies(x: torch.Tensor) -> bool:
    """Whether greedy decoding's argmax over (rows, vocabulary) float32 scores goes to loom::argmax_rows."""
    return x.dtype is torch.float32 and x.dim() == 2 and x.shape[1] > 0 and plain(x) and enabled()


def decode_on_kernels(model: nn.Module, rows: int) -> bool:
    """Whether every matmul of a `rows`-row decode step of `model` runs in loom's kernels, so torch's remaining small
    ops may run on one thread meanwhile (`loom.kernels.threads.kernels_own_threads`).

    Every Linear-like module must say so itself through `uses_kernels(rows, dtype)` (loom's kernel Linear and its
    int8/int4 Linears do); any other Linear (a bitsandbytes layer, a PEFT adapter's own Linears) means no."""
    dtype = getattr(model, "dtype", None)
    if (model.device.type != "cpu" or rows > MAX_ROWS or dtype not in DTYPES or not enabled()
            or (dtype is torch.bfloat16 and rows > 1 and not batched_bf16())):
        return False
    for m in model.modules():
        uses = getattr(m, "uses_kernels", None)
        if uses is not None:
            if not uses(rows, dtype):
                return False
        elif isinstance(m, nn.Linear):
            return False
    return True


def prefill_on_kernels(model: nn.Module, rows: int, batch: int) -> bool:
    """Whether every matmul of a prefill over `rows` token rows (`batch` sequences, no padding mask) runs in loom's
    kernels, so torch's remaining ops may run on one thread meanwhile as in decode: the quantized Linears' blocked
    GEMMs, loom::flash_attention for the attention, and the output head on the last position's `batch` rows.

    Measured on the bench Llama at 2 threads (512-token prompt, int4): time to first token 410-418 ms without the
    hand-off, 211-272 ms with it. torch's OpenMP worker, spinning after each of torch's ops, takes the second core
    from the kernels' pool helper. Every weight matrix must belong to a module that says its product runs in the
    kernels at that row count (`uses_kernels`) or to an embedding; anything else (a float Linear, which torch's GEMM
    computes at prefill sizes, packed MoE experts, a convolution) means no."""
    dtype, config = getattr(model, "dtype", None), getattr(model, "config", None)
    if (model.device.type != "cpu" or dtype not in DTYPES or rows <= MAX_ROWS or not enabled()
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or getattr(config, "attn_logit_softcapping", None)):  # soft-capped attention is torch's eager matmuls
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _products_on_kernels(model, rows, dtype, head, batch)


def _products_on_kernels(root: nn.Module, rows: int, dtype, head: nn.Module | None = None, batch: int = 0) -> bool:
    """Every weight matrix under `root` belongs to a module that says its product runs in loom's kernels at `rows`
    rows (`uses_kernels`; `head` at `batch` rows) or to an embedding (a lookup)."""
    for m in root.modules():
        uses = getattr(m, "uses_kernels", None)
        if uses is not None:
            if not uses(batch if m is head else rows, dtype):
                return False
        elif isinstance(m, nn.Embedding):
            continue
        elif any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            return False
    return True


def encoder_on_kernels(layers: nn.Module, rows: int, dtype) -> bool:
    """Whether every matmul of an encoder's layers (`layers`: the stack, without embeddings or heads) over `rows`
    token rows runs in loom's kernels in inference, so torch's remaining ops (layer norms, residual adds) may run on
    one thread meanwhile (`loom.kernels.threads.kernels_own_threads`): fp32 Linears that say so at that row count
    (`uses_kernels`: the blocked GEMM), no other weight matrix, no autograd, eval mode. The caller checks that the
    attention goes to loom::flash_attention (no mask, or a right-padded one, `padded_flash_applies`).

    Measured on MiniLM (2 threads, 640 texts, batch 32): torch's OpenMP worker, spinning after each layer norm and
    add, took ~20% of the CPU samples while the GEMM's pool helper wanted the second core."""
    if (torch.is_grad_enabled() or dtype is not torch.float32 or rows <= MAX_ROWS or not enabled()
            or layers.training):
        return False
    return _products_on_kernels(layers, rows, dtype)  # (an embedding: MPNet's relative position bias table)
