"""Gradient checkpointing: peak memory and step time of a training step, with and without, by sequence length.

    python docs/heuristics/gradient_checkpointing.py [--tiny] [--out DIR]

Each (sequence length, on/off) point runs in its own process so its peak resident memory is its own. Memory is the
peak RSS during forward + backward minus the RSS after a warm-up step (which holds the weights and gradients), i.e.
what the activations cost. Time is the mean CPU time (process time, one
thread) of the timed forward + backward steps: on a shared machine wall time mostly measures the neighbours.
"""
from __future__ import annotations

import time

from _common import (environment_note, one_thread, parse_args, peak_rss_mib, pyplot, rss_mib, run_worker, save,
                     tiny_llama_config, run_script)

FULL = dict(model=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, vocab_size=2048),
            batch=4, seqs=[128, 256, 512, 1024], steps=3)
TINY = dict(model=dict(), batch=2, seqs=[32, 64], steps=1)


def worker(p: dict) -> dict:
    import torch
    import torch.utils.checkpoint  # noqa: F401  (imported before the baseline so its own memory is not counted)

    from loom.models.llama import LlamaForCausalLM

    one_thread()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**p["model"])).train()
    if p["checkpointing"]:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, model.config.vocab_size, (p["batch"], p["seq"]))
    # one warm-up step first: it allocates the gradients and imports what checkpointing loads lazily, so the
    # baseline taken after it holds weights + gradients and the peak above it is the step's activations
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=False)
    base = rss_mib()
    times = []
    for _ in range(p["steps"]):
        start = time.process_time()  # CPU time of a one-thread process: what other users of the machine don't skew
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.process_time() - start)
        model.zero_grad(set_to_none=False)
    return {"peak_mib": peak_rss_mib() - base, "step_s": sum(times) / len(times)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    s = TINY if args.tiny else FULL
    rows = []
    for seq in s["seqs"]:
        for ckpt in (False, True):
            r = run_worker(__file__, dict(model=s["model"], batch=s["batch"], seq=seq, steps=s["steps"],
                                          checkpointing=ckpt),
                           inline=worker if args.tiny else None)
            rows.append({"seq": seq, "checkpointing": ckpt, **r})
            print(rows[-1])
    plt = pyplot()
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for ckpt, label in ((False, "no checkpointing"), (True, "gradient checkpointing")):
        pts = [r for r in rows if r["checkpointing"] == ckpt]
        ax_mem.plot([r["seq"] for r in pts], [r["peak_mib"] for r in pts], "o-", label=label)
        ax_time.plot([r["seq"] for r in pts], [r["step_s"] for r in pts], "o-", label=label)
    for ax, ylabel in ((ax_mem, "peak memory of a step above the model (MiB)"),
                       (ax_time, "forward+backward (CPU s, 1 thread)")):
        ax.set_xlabel(f"sequence length (batch {s['batch']})")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.suptitle(f"Llama {s['model'] or 'tiny'}, 1 torch thread — {environment_note()}", fontsize=8)
    save(fig, "gradient_checkpointing", args.out, {"settings": s, "rows": rows})


if __name__ == "__main__":
    run_script(main, worker)
