"""Gradient accumulation vs a bigger batch: throughput, peak memory, and proof that the losses match.

    python docs/heuristics/grad_accumulation.py [--tiny] [--out DIR]

Every run trains the same tiny Llama from the same weights on the same shuffled variable-length sequences with the
same effective batch (16 sequences per optimizer step), split as micro-batch x accumulation steps = 16x1, 8x2,
4x4, 2x8, 1x16, through loom's Trainer. The Trainer divides each micro-batch's summed token loss by the target
tokens of the whole accumulated batch, so every split takes the same optimizer steps. A last run ("naive") turns
that counting off (the mean of per-micro-batch means, what a hand-written loop usually does) to show the
difference it makes when sequence lengths vary. Throughput is tokens per CPU-second of the one-thread process.
"""
from __future__ import annotations

import tempfile

from _common import (environment_note, one_thread, parse_args, peak_rss_mib, pyplot, rss_mib, run_worker, save,
                     tiny_llama_config, run_script)

EFFECTIVE = 16
FULL = dict(model=dict(hidden_size=128, intermediate_size=344, vocab_size=256), steps=25, rows=EFFECTIVE * 25,
            max_len=96, splits=[16, 8, 4, 2, 1])
TINY = dict(model=dict(vocab_size=256), steps=3, rows=EFFECTIVE * 3, max_len=24, splits=[16, 4])


def make_rows(n: int, max_len: int, vocab: int) -> list[dict]:
    """Sequences of varying length from a noisy rule (next = 3*prev + 1 mod vocab), so the loss can fall."""
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length = int(torch.randint(8, max_len + 1, (1,), generator=g))
        ids = [int(torch.randint(0, vocab, (1,), generator=g))]
        for _ in range(length - 1):
            noisy = torch.rand((), generator=g) < 0.1
            ids.append(int(torch.randint(0, vocab, (1,), generator=g)) if noisy else (3 * ids[-1] + 1) % vocab)
        rows.append({"input_ids": ids})
    return rows


def collate(rows: list[dict]) -> dict:
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def worker(p: dict) -> dict:
    import time

    import torch

    from loom.models.llama import LlamaForCausalLM
    from loom.training import Trainer, TrainingArguments

    class NaiveTrainer(Trainer):
        def count_loss_items(self, batches):
            return None  # falls back to averaging the micro-batch means

    one_thread()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**p["model"]))
    rows = make_rows(p["rows"], p["max_len"], p["model"]["vocab_size"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=p["micro"],
                                 gradient_accumulation_steps=EFFECTIVE // p["micro"], max_steps=p["steps"],
                                 learning_rate=2e-3, logging_steps=1, save_strategy="no", report_to="none",
                                 disable_tqdm=True, seed=0, optim="adamw_torch")
        trainer = (NaiveTrainer if p["naive"] else Trainer)(model=model, args=args, train_dataset=rows,
                                                           data_collator=collate)
        base = rss_mib()
        start = time.process_time()  # CPU time of a one-thread process: what other users of the machine don't skew
        trainer.train()
        seconds = time.process_time() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(r["input_ids"]) for r in rows[:EFFECTIVE * p["steps"]])
    weights = torch.cat([q.detach().flatten() for q in model.parameters()])
    return {"losses": losses, "tokens_per_s": tokens / seconds, "peak_mib": peak_rss_mib() - base,
            "weights_head": weights[:4096].tolist()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    s = TINY if args.tiny else FULL
    runs = [(micro, False) for micro in s["splits"]] + [(s["splits"][-1], True)]
    results = []
    for micro, naive in runs:
        payload = dict(model=s["model"], steps=s["steps"], rows=s["rows"], max_len=s["max_len"], micro=micro,
                       naive=naive)
        r = run_worker(__file__, payload, inline=worker if args.tiny else None)
        results.append({"micro": micro, "accumulation": EFFECTIVE // micro, "naive": naive, **r})
    ref_losses, ref_weights = results[0]["losses"], results[0]["weights_head"]
    for r in results:
        r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], ref_losses))
        r["max_weight_diff"] = max(abs(a - b) for a, b in zip(r.pop("weights_head"), ref_weights))
    for r in results:
        print({k: v for k, v in r.items() if k != "losses"})
    plt = pyplot()
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = f"{r['micro']} x {r['accumulation']}" + (" naive mean-of-means" if r["naive"] else "")
        style = dict(ls="--", color="black") if r["naive"] else {}
        ax_loss.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label, alpha=0.8, **style)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("same effective batch: curves lie on top of each other", fontsize=9)
    ax_loss.legend(title="micro-batch x accumulation", fontsize=8)
    plain = [r for r in results if not r["naive"]]
    ax_tps.bar([f"{r['micro']}x{r['accumulation']}" for r in plain], [r["tokens_per_s"] for r in plain])
    ax_tps.set_xlabel("micro-batch x accumulation steps")
    ax_tps.set_ylabel("training tokens per CPU-second (1 thread)")
    for i, r in enumerate(plain):
        ax_tps.annotate(f"{r['peak_mib']:.0f} MiB", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    ax_tps.set_title("throughput (labels: peak memory above the model)", fontsize=9)
    fig.suptitle(f"Llama {s['model']}, effective batch {EFFECTIVE}, 1 torch thread — {environment_note()}",
                 fontsize=8)
    save(fig, "grad_accumulation", args.out, {"settings": s, "runs": results})


if __name__ == "__main__":
    run_script(main, worker)
