"""Per-token overhead of loom's decode step outside the matmul kernels, on bench_generate.py's model (batch 1).

    .venv/bin/python bench/bench_decode_overhead.py [--dtypes fp32,bf16] [--batch 1] [--reps 7] [--cprofile]
                                                    [--no-matmul] [--ab | --no-plan | --module-path]

One thread, CPU time (`time.process_time`), medians: the machine is shared, and CPU time does not count the time
other processes take the core. Per decode step:
- step: (generate of `--long` new tokens - generate of `--short`) / (long - short), the model's default generation
  config (EOS set, greedy), so the generate loop and its EOS check are counted;
- kernel floor: the model's own Linears (loom's kernel) called alone on decode-sized inputs, nothing around them;
- overhead = step - kernel floor, and the torch ops per step (torch.profiler, the same difference of two runs).
With --no-matmul the kernel's products are replaced by zeros (tokens then mean nothing), in the steps and the floor
alike: the overhead without the ~20-40 ms of memory-bound matmuls whose noise otherwise drowns it. The whole-layer
kernel (loom::decode_layer_attention) then runs without its products (its checks, norms, RoPE, cache write and
attention, on zero projections; a little more than the real call: a few extra allocations), or with --module-path
not at all: the path of layers it does not apply to (hooked, PEFT-wrapped, variant layers). With --cprofile
the Python functions of the steps are printed too. A benchmark to read, not a test.

The decode plan (loom/generation/decode_plan.py) runs a Llama-shaped model's steps through one C call per layer
(loom_decode_chain_step; with --no-matmul its products are zeros too). It calls no Linear as a module but the head,
so the kernel floor, which includes ~85 Linear module calls, is then above the step's own Python: with --no-matmul
the step itself is the honest bound on the per-token cost outside the matmul kernels (norms, RoPE, cache writes and
attention included). `--ab` times each rep without the plan as well (the per-layer path, interleaved); `--no-plan`
takes that path only; `--module-path` neither the plan nor the whole-layer kernel.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.bench_generate import CONFIG, DTYPES  # noqa: E402


def build(dtype):
    import loom

    torch.manual_seed(0)
    return loom.LlamaForCausalLM(loom.LlamaConfig(**CONFIG)).to(dtype).eval()


def generate(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    assert out.shape[1] == ids.shape[1] + n, "EOS came early: pick another prompt"
    return out


def cpu_time(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def linears_step(model, batch, dtype):
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(batch, 1, m.in_features, dtype=dtype) for m in modules}

    def step():
        with torch.inference_mode():
            for m in modules:
                m(xs[m.in_features])
    return step


def layer_without_products(x, ln1, ln2, eps, wq, wk, wv, wo, wg, wu, bq, bk, bv, bo, bg, bu, cos, sin, kc, vc, pos,
                           length, mask, scale):
    """loom::decode_layer_attention with its six products taken out (--no-matmul): the operator's checks and outputs,
    its norms, RoPE, cache write and attention through the same C functions, on zero projections."""
    from loom.kernels import build, ops
    from loom.kernels.threads import pool_threads

    lib = build.library()
    assert ops._layer_fits(x, ln1, ln2, (wq, wk, wv, wo, wg, wu), (bq, bk, bv, bo, bg, bu), cos, sin, kc, vc, pos,
                           length, mask)
    B, _, hidden = x.shape
    Hkv, D, bf16 = kc.shape[1], kc.shape[3], x.dtype is torch.bfloat16
    x_out, h = torch.empty_like(x), torch.empty_like(x)
    g, u = x.new_zeros(B, 1, wg.shape[0]), x.new_zeros(B, 1, wg.shape[0])
    q, kv, attn = x.new_zeros(B, 1, wq.shape[0]), x.new_zeros(B, 1, Hkv * D), x.new_empty(B, 1, wq.shape[0])
    lib.loom_rms_norm(x.data_ptr(), ln1.data_ptr(), h.data_ptr(), bf16, B, hidden, eps, pool_threads())
    lib.loom_rope_cache_attention(q.data_ptr(), q.shape[-1], kv.data_ptr(), kv.shape[-1], kv.data_ptr(),
                                  kv.shape[-1], cos.data_ptr(), sin.data_ptr(), 0, kc.data_ptr(), vc.data_ptr(),
                                  kc.stride(0), kc.stride(1), pos, None, 0, attn.data_ptr(), bf16, B,
                                  wq.shape[0] // D, Hkv, length, D, scale, pool_threads())
    x_out.copy_(x)
    lib.loom_rms_norm(x_out.data_ptr(), ln2.data_ptr(), h.data_ptr(), bf16, B, hidden, eps, pool_threads())
    return x_out, g, u


def op_counts(model, ids, short, long) -> Counter:
    def ops(n):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            generate(model, ids, n)
        return Counter(e.name for e in prof.events())
    a, b = ops(short), ops(long)
    return Counter({k: (b[k] - a[k]) / (long - short) for k in b if b[k] > a[k]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--no-matmul", action="store_true")
    parser.add_argument("--module-path", action="store_true", help="with --no-matmul: no whole-layer kernel")
    parser.add_argument("--no-plan", action="store_true", help="without the decode plan (generation/decode_plan.py)")
    parser.add_argument("--ab", action="store_true", help="each rep also without the decode plan (interleaved)")
    args = parser.parse_args()
    from loom.generation import decode_plan

    if args.module_path or args.no_plan:
        decode_plan.DecodePlan.build = classmethod(lambda cls, *a: None)
    if args.no_matmul:
        from loom.kernels import chain, ops

        ops.dense_linear = lambda x, w, b: x.new_zeros(*x.shape[:-1], w.shape[0])
        chain_init = chain.DecodeChain.__init__

        def init_without_products(self, *a, **kw):
            chain_init(self, *a, **kw)
            self._step.no_products = 1
        chain.DecodeChain.__init__ = init_without_products
        if args.module_path:
            import loom.models.llama

            loom.models.llama.fused_decode_layer = lambda *args, **kwargs: None
        else:
            ops.decode_layer_attention = layer_without_products
    torch.set_num_threads(1)
    ids = torch.randint(3, CONFIG["vocab_size"], (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    print(f"load average {os.getloadavg()[0]:.1f}; 1 thread, CPU time, medians of {args.reps}; batch {args.batch}, "
          f"prompt {args.prompt}, step = (generate {args.long} - generate {args.short}) / {args.long - args.short}")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        model = build(dtype)
        floor_step = linears_step(model, args.batch, dtype)
        generate(model, ids, 2)
        steps, floors, without = [], [], []
        for _ in range(args.reps):  # interleaved, so load drifting during the run hits both alike
            t_short = cpu_time(lambda: generate(model, ids, args.short))
            t_long = cpu_time(lambda: generate(model, ids, args.long))
            steps.append((t_long - t_short) / (args.long - args.short))
            floors.append(cpu_time(lambda: [floor_step() for _ in range(10)]) / 10)
            if args.ab:
                planned = decode_plan.DecodePlan.build
                decode_plan.DecodePlan.build = classmethod(lambda cls, *a: None)
                t_short = cpu_time(lambda: generate(model, ids, args.short))
                t_long = cpu_time(lambda: generate(model, ids, args.long))
                without.append((t_long - t_short) / (args.long - args.short))
                decode_plan.DecodePlan.build = planned
        step, floor = statistics.median(steps), statistics.median(floors)
        if args.ab:
            w = statistics.median(without)
            print(f"{name} without the decode plan: step {w * 1e3:.2f} ms (best {min(without) * 1e3:.2f}), overhead "
                  f"{(w - floor) * 1e3:.2f} ms/token")
        counts = op_counts(model, ids, args.short, args.long)
        aten = {k: v for k, v in counts.items() if k.startswith(("aten::", "loom::"))}
        top = ", ".join(f"{k.split('::')[1]} {v:g}" for k, v in sorted(aten.items(), key=lambda kv: -kv[1])[:12])
        print(f"{name}: step {step * 1e3:.2f} ms (best {min(steps) * 1e3:.2f}), kernel floor {floor * 1e3:.2f} ms, "
              f"overhead {(step - floor) * 1e3:.2f} ms/token | torch ops per step {sum(aten.values()):g}: {top}", flush=True)
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            generate(model, ids, args.long)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
