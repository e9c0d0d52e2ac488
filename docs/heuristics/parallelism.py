"""Tensor vs data vs context parallel: tokens/s and memory per rank with 1, 2 and 4 processes.

    python docs/heuristics/parallelism.py [--tiny] [--out DIR]

Every run trains the same Llama on the same global batch (sequences x length per optimizer step) through
`loom.distributed.setup_parallel`, launched torchrun-style (RANK / WORLD_SIZE / MASTER_ADDR env) on gloo:

  dp    replicated data parallel: each rank holds the whole model and 1/N of the batch, gradients all-reduced
  fsdp  FSDP2: as dp, but parameters, gradients and optimizer state sharded 1/N (all-gathered per block)
  tp    tensor parallel: every weight matrix split 1/N (attention heads, MLP columns); every rank sees every token
  cp    context parallel: every rank holds the whole model and 1/N of each sequence (ring attention)

Measured on rank 0: training tokens/s (wall; the ranks work in parallel, so CPU time would hide the point), the
bytes of parameters + AdamW state the rank holds (local shards), and the bytes of activations it saves for backward
(counted by a saved-tensors hook, the rank's own parameters excluded).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, environment_note, parse_args, pyplot, save, tiny_llama_config

FULL = dict(model=dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, vocab_size=1024),
            seq=256, batch=8, steps=4, worlds=[1, 2, 4], modes=["dp", "fsdp", "tp", "cp"])
TINY = dict(model=dict(), seq=32, batch=4, steps=1, worlds=[2], modes=["cp"])


def worker(p: dict, out: Path) -> None:
    import torch

    from loom.distributed import setup_parallel
    from loom.models.llama import LlamaForCausalLM

    torch.set_num_threads(1)
    mode, world = p["mode"], int(os.environ.get("WORLD_SIZE", "1"))
    sizes = {"tp": dict(tp_size=world), "cp": dict(cp_size=world), "fsdp": dict(fsdp=True)}.get(mode, {})
    ctx = setup_parallel(**sizes)
    torch.manual_seed(0)
    model = ctx.wrap_model(LlamaForCausalLM(tiny_llama_config(**p["model"])).train())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(ctx.dp_rank)
    micro = p["batch"] // ctx.dp_size
    own = {_local(q).data_ptr() for q in model.parameters()}
    saved = {"bytes": 0}

    def pack(t):
        t_local = _local(t)
        if t_local.data_ptr() not in own:
            saved["bytes"] += t_local.numel() * t_local.element_size()
        return t

    times = []
    for step in range(p["steps"] + 1):  # step 0 warms up
        ids = torch.randint(0, model.config.vocab_size, (micro, p["seq"]), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        start = time.perf_counter()
        saved["bytes"] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # counts what the forward saves
            ctx.train_step(model, opt, [batch], max_grad_norm=1.0)
        activations = saved["bytes"]
        if step:
            times.append(time.perf_counter() - start)
    params = sum(_nbytes(q) for q in model.parameters())
    optim = sum(_nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    if ctx.rank == 0:
        out.write_text(json.dumps({"tokens_per_s": p["batch"] * p["seq"] * len(times) / sum(times),
                                   "state_mib": (params + optim) / 2**20, "activation_mib": activations / 2**20}))
    # Leave the group together: a rank that exits with its gloo group alive can abort in the group's destructor
    # ("terminate called without an active exception", 1 run in 6 here).
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def launch(payload: dict, world: int) -> dict:
    from loom.distributed.launch import check_ranks, launch_local

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        results = launch_local(world, [__file__, "--rank", json.dumps(payload), out], env={"PYTHONPATH": str(ROOT)},
                               timeout=600)
        check_ranks(results, f"{payload['mode']} x{world}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    s = TINY if args.tiny else FULL
    rows = []
    for world in s["worlds"]:
        for mode in (["single"] if world == 1 else s["modes"]):
            r = launch(dict(mode=mode, model=s["model"], seq=s["seq"], batch=s["batch"], steps=s["steps"]), world)
            rows.append({"world": world, "mode": mode, **r})
            print(rows[-1])
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    single = rows[0] if rows[0]["world"] == 1 else None
    for ax, key, label in ((axes[0], "tokens_per_s", "training tokens/s (wall)"),
                           (axes[1], "state_mib", "params + AdamW state per rank (MiB)"),
                           (axes[2], "activation_mib", "activations saved per rank (MiB)")):
        if single is not None:
            ax.axhline(single[key], color="gray", ls=":", label="1 process")
        for mode in s["modes"]:
            pts = [r for r in rows if r["mode"] == mode]
            ax.plot([r["world"] for r in pts], [r[key] for r in pts], "o-", label=mode)
        ax.set_xlabel("processes")
        ax.set_xticks([w for w in s["worlds"] if w > 1])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"Llama {s['model']}, global batch {s['batch']}x{s['seq']} tokens, gloo on CPU, 1 thread per "
                 f"process — {environment_note()}", fontsize=8)
    save(fig, "parallelism", args.out, {"settings": s, "rows": rows})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rank":
        worker(json.loads(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
