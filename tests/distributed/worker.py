"""One rank of a multi-process test suite: `python worker.py SUITE OUT_DIR CKPT_DIR...` under torchrun's env vars.

Each scenario saves what it measured to OUT_DIR/<scenario>.pt (rank 0) or <scenario>.rank<r>.pt; the pytest side
compares with a single-process run. Assertions stay on the pytest side.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import dist_helpers as H
from loom.distributed import (load_dcp, ring_attention, save_dcp, save_pretrained_distributed, setup_parallel,
                              zigzag_shard, zigzag_unshard)

torch.set_num_threads(1)
OUT: Path


def save(name: str, value, every_rank: bool = False) -> None:
    rank = dist.get_rank()
    if every_rank:
        torch.save(value, OUT / f"{name}.rank{rank}.pt")
    elif rank == 0:
        torch.save(value, OUT / f"{name}.pt")


def gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


# -- scenarios ----------------------------------------------------------------------------------------------------------
def tensor_parallel(ckpt: str, tp: int) -> None:
    ctx = setup_parallel(tp_size=tp)
    model = H.load_model(ckpt, tp_plan="auto", device_mesh=ctx.mesh)
    attn = model.model.layers[0].self_attn
    shapes = {n: tuple(p.to_local().shape) for n, p in
              [("q", attn.q_proj.weight), ("k", attn.k_proj.weight), ("o", attn.o_proj.weight),
               ("embed", model.model.embed_tokens.weight), ("lm_head", model.lm_head.weight)]}
    batch = H.collate(H.dataset(2))
    out = model(**batch, use_cache=False)
    out.loss.backward()
    result = {"shapes": shapes, "logits": out.logits.detach(), "loss": out.loss.detach(), "grads": H.full_grads(model)}
    result["norm"] = ctx.clip_grad_norm_(model, 0.05)
    result["clipped"] = H.full_grads(model)
    save(f"tp{tp}", result)
    save(f"tp{tp}_shapes", shapes, every_rank=True)
    save_pretrained_distributed(model, OUT / f"tp{tp}_saved")


def tp_families(gpt2: str, bert: str) -> None:
    ctx = setup_parallel(tp_size=2)
    save("tp2_families", H.family_outputs(gpt2, bert, tp_plan="auto", device_mesh=ctx.mesh))


def ring(cp: int) -> None:
    ctx = setup_parallel(cp_size=cp)
    group, r = ctx.group("cp"), ctx.cp_rank
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, h, 8 * cp, 8, generator=g) for h in (4, 2, 2, 4))
    local = [zigzag_shard(t, r, cp, dim=2).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group)
    out.backward(zigzag_shard(dout, r, cp, dim=2))
    full = [zigzag_unshard(gather(t, group), dim=2) for t in (out.detach(), *(x.grad for x in local))]
    save(f"ring{cp}", {"q": q, "k": k, "v": v, "dout": dout, "out": full[0], "grads": full[1:]})


def cp_model(ckpt: str, cp: int) -> None:
    ctx = setup_parallel(cp_size=cp)
    model = ctx.wrap_model(H.load_model(ckpt))
    batch = H.collate(H.dataset(2))
    n = ctx.count_tokens([batch])
    loss = ctx.compute_loss(model, ctx.prepare_batch(batch), n)
    loss.backward()
    ctx.sync_gradients(model)
    save(f"cp{cp}_model", {"loss": ctx.reduce_loss(loss), "grads": H.full_grads(model)})


def fsdp_training(ckpt: str, dcp_dir: str | None = None, dp_replicate: int = 1) -> None:
    """5 steps at a global batch of 8 (micro-batches x accumulation 2); optionally a DCP save after step 3.

    dp_replicate > 1 is HSDP: parameters sharded within each replica group and replicated across the groups.
    """
    ctx = setup_parallel(fsdp=True, dp_replicate=dp_replicate)
    model = ctx.wrap_model(H.load_model(ckpt))
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    opt = H.optimizer_for(model)
    data, micro = H.dataset(40), 8 // (2 * ctx.dp_size)
    losses = H.train(ctx, model, opt, data, range(3), micro, accum=2)
    if dcp_dir:
        save_dcp(dcp_dir, model, opt, {"step": 3})
    losses += H.train(ctx, model, opt, data, range(3, 5), micro, accum=2)
    name = f"hsdp{dp_replicate}x{ctx.dims.dp_shard}" if dp_replicate > 1 else f"fsdp{ctx.world_size}"
    save(name, {"losses": losses, "local_numel": local_numel, "state": H.full_state(model)})


def fsdp_mixed_precision(ckpt: str) -> None:
    """FSDP2 with bf16 parameters in compute: 3 steps at a global batch of 8; fp32 master shards and gradients."""
    ctx = setup_parallel(fsdp=True, param_dtype=torch.bfloat16)
    model = ctx.wrap_model(H.load_model(ckpt))
    seen = set()
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.add((m.weight.dtype, o.dtype)))
    opt = H.optimizer_for(model)
    losses = H.train(ctx, model, opt, H.dataset(40), range(3), 8 // (2 * ctx.dp_size), accum=2)
    batch = H.collate(H.dataset(2))
    ctx.compute_loss(model, ctx.prepare_batch(batch), ctx.count_tokens([batch])).backward()
    save("fsdp_bf16", {"losses": losses, "compute_dtypes": seen,
                       "master_dtypes": {p.to_local().dtype for p in model.parameters()},
                       "grad_dtypes": {p.grad.to_local().dtype for p in model.parameters() if p.grad is not None}})


def resume(ckpt: str, dcp_dir: str) -> None:
    ctx = setup_parallel(fsdp=True)
    model = ctx.wrap_model(H.load_model(ckpt))
    opt = H.optimizer_for(model)
    extra = load_dcp(dcp_dir, model, opt)
    losses = H.train(ctx, model, opt, H.dataset(40), range(extra["step"], 5), 8 // (2 * ctx.dp_size), accum=2)
    save(f"resume{ctx.world_size}", {"losses": losses, "extra": extra})


def errors_on_every_rank(ckpt_kv1: str, dcp_dir: str) -> None:
    """Bad input must raise the same clear error on every rank (nothing collective runs before the check)."""
    from loom.models.llama import LlamaConfig, LlamaForCausalLM

    messages = {}

    def record(name, fn):
        try:
            fn()
            messages[name] = None
        except (ValueError, RuntimeError) as e:
            messages[name] = f"{type(e).__name__}: {e}"

    ctx = setup_parallel(tp_size=2)
    record("kv_heads", lambda: H.load_model(ckpt_kv1, tp_plan="auto", device_mesh=ctx.mesh))
    record("dims", lambda: setup_parallel(tp_size=3))
    record("seq_len", lambda: setup_parallel(cp_size=2).prepare_batch(H.collate(H.dataset(1, seq_len=14))))
    other = LlamaForCausalLM(LlamaConfig(**{**H.TINY_LLAMA, "intermediate_size": 80}))
    record("other_model", lambda: load_dcp(dcp_dir, other))
    save("errors", messages, every_rank=True)


def fault() -> None:
    """Rank 1 dies before a collective; rank 0 must get an error within the process-group timeout, not hang."""
    dist.barrier()
    if dist.get_rank() == 1:
        raise RuntimeError("injected fault on rank 1")
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        save("fault", {"error": None, "seconds": time.monotonic() - start}, every_rank=True)
    except Exception as e:  # noqa: BLE001 - whatever the backend raises, record it
        save("fault", {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}, every_rank=True)
        raise


def cube(ckpt: str) -> None:
    """dp2 x tp2 x cp2 with FSDP over dp x cp: 3 steps at a global batch of 4."""
    ctx = setup_parallel(tp_size=2, cp_size=2, fsdp=True)
    model = ctx.wrap_model(H.load_model(ckpt, tp_plan="auto", device_mesh=ctx.mesh))
    opt = H.optimizer_for(model)
    losses = H.train(ctx, model, opt, H.dataset(12), range(3), 4 // ctx.dp_size)
    save("cube", {"losses": losses, "dims": ctx.dims.shape})


SUITES = {  # quad writes the DCP checkpoint that pair resumes; pair ends with the injected fault
    "quad": lambda a: (tensor_parallel(a[1], 4), ring(4), fsdp_training(a[0], a[3]), fsdp_training(a[0], dp_replicate=2)),
    "pair": lambda a: (tensor_parallel(a[0], 2), tp_families(a[4], a[5]), ring(2), cp_model(a[0], 2), fsdp_training(a[0]),
                       fsdp_mixed_precision(a[0]), resume(a[0], a[3]),
                       errors_on_every_rank(a[2], a[3]), fault()),
    "cube": lambda a: (cube(a[0]),),
}


def main() -> None:
    global OUT
    suite, OUT, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    try:
        SUITES[suite](args)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
