"""device_map and offload: how much of a model stays in memory under a max_memory budget, and what offload costs.

    python docs/heuristics/device_map.py [--tiny] [--out DIR]

A Llama checkpoint is saved once; each budget then loads it in its own process with
`from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)` (no budget: a plain load) and
runs the same forward pass. Measured: the share of weights kept in memory vs offloaded to disk, the process's peak
resident memory (peak, and after the forward split into anonymous heap and
file-backed pages), load time, and forward time (wall, since offload time is I/O; the page cache is warm after the first
pass, so this is the best case for disk offload). On a GPU machine the same budgets split GPU vs CPU first.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import (environment_note, one_thread, parse_args, peak_rss_mib, pyplot, rss_parts_mib, run_worker,
                     save, tiny_llama_config, run_script)

FULL = dict(model=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, vocab_size=4096),
            fractions=[None, 1.2, 0.75, 0.5, 0.3], tokens=128, repeats=3)
TINY = dict(model=dict(), fractions=[None, 0.9], tokens=8, repeats=1)


def worker(p: dict) -> dict:
    import torch

    from loom.models.llama import LlamaForCausalLM

    one_thread()
    kwargs = {}
    if p["budget"] is not None:
        kwargs = dict(device_map="auto", max_memory={"cpu": int(p["budget"])}, offload_folder=p["offload"])
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(p["path"], **kwargs)
    load_s = time.perf_counter() - start
    device_map = getattr(model, "hf_device_map", None) or {"": "cpu"}
    sizes = {n: q.numel() * q.element_size() for n, q in model.state_dict().items()}
    on_disk = sum(size for n, size in sizes.items()
                  if any(str(d) == "disk" and (k == "" or n.startswith(k + ".")) for k, d in device_map.items()))
    ids = torch.randint(0, model.config.vocab_size, (1, p["tokens"]))
    times = []
    with torch.inference_mode():
        for _ in range(p["repeats"] + 1):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return {"load_s": load_s, "forward_s": min(times[1:]) if len(times) > 1 else times[0],
            "disk_fraction": on_disk / sum(sizes.values()), "peak_rss_mib": peak_rss_mib(), **rss_parts_mib(),
            "device_map": {k: str(v) for k, v in device_map.items()}}


def main(argv: list[str] | None = None) -> None:
    import torch

    from loom.models.llama import LlamaForCausalLM

    args = parse_args(__doc__.splitlines()[0], argv)
    s = TINY if args.tiny else FULL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(**s["model"]))
        model_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
        model.save_pretrained(Path(tmp) / "model")
        del model
        for fraction in s["fractions"]:
            budget = None if fraction is None else fraction * model_bytes
            payload = dict(path=str(Path(tmp) / "model"), budget=budget, offload=str(Path(tmp) / f"off{fraction}"),
                           tokens=s["tokens"], repeats=s["repeats"])
            r = run_worker(__file__, payload, inline=worker if args.tiny else None)
            rows.append({"budget_fraction": fraction, "budget_mib": None if budget is None else budget / 2**20,
                         **r})
            print({k: v for k, v in rows[-1].items() if k != "device_map"})
    labels = ["no device_map" if r["budget_fraction"] is None else f"auto, cpu ≤ {r['budget_fraction']:.0%}"
              for r in rows]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    axes[1].bar(range(len(rows)), [r["RssAnon"] for r in rows], label="anonymous (heap)")
    axes[1].bar(range(len(rows)), [r["RssFile"] for r in rows], bottom=[r["RssAnon"] for r in rows],
                label="file-backed (mmap, reclaimable)")
    axes[1].legend(fontsize=7)
    for ax, key, label in ((axes[0], "disk_fraction", "share of weights offloaded to disk"),
                           (axes[1], None, "resident memory after the forward (MiB)"),
                           (axes[2], "forward_s", f"forward of {s['tokens']} tokens (s, wall)")):
        if key is not None:
            ax.bar(range(len(rows)), [r[key] for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
    fig.suptitle(f"Llama {s['model']} ({model_bytes / 2**20:.0f} MiB fp32), max_memory as a share of it, "
                 f"1 torch thread — "
                 f"{environment_note()}", fontsize=8)
    save(fig, "device_map", args.out, {"settings": s, "model_mib": model_bytes / 2**20, "rows": rows})


if __name__ == "__main__":
    run_script(main, worker)
