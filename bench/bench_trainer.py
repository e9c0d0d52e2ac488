"""Training throughput: loom's Trainer vs the reference's Trainer vs a hand-written PyTorch loop.

Fine-tunes all-MiniLM-L6-v2 for sequence classification (batch 16, length 64, fp32, AdamW fused, linear schedule,
gradient clipping at 1.0, no logging or saving) and reports steps/s over the steps after a warm-up, in one process
on the same inputs. The hand-written loop runs twice, with loom's model and with the reference's, so that the
Trainer ratios compare loops on the same model. The hand loop uses the Trainers' optimizer settings (fused AdamW,
no weight decay). Runs go in ABBA order and each row prints as soon as it is measured, with the load average.

    python bench/bench_trainer.py [--steps 60] [--warmup 5] [--threads N] [--model DIR]

--model points at another checkpoint of the same architecture (e.g. a randomly initialised MiniLM-sized BERT on a
machine without the embedded weights: the speed is the same).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

BATCH, LENGTH, LR = 16, 64, 5e-5


def make_rows(steps: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    n = BATCH * steps
    ids = torch.randint(1000, 30000, (n, LENGTH), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
             "token_type_ids": torch.zeros(LENGTH, dtype=torch.long), "labels": labels[i]} for i in range(n)]


class Clock:
    """Wall time between the end of step `warmup` and the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def step_done(self, step: int) -> None:
        if step == self.warmup:
            self.start = time.perf_counter()
        self.end, self.steps = time.perf_counter(), step - self.warmup

    @property
    def steps_per_second(self) -> float:
        return self.steps / (self.end - self.start)


def clock_callback(base, clock):
    class Timing(base):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(state.global_step)

    return Timing()


def loom_model(path):
    import loom

    torch.manual_seed(0)
    return loom.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def ref_model(path):
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def run_loom_trainer(path, rows, steps, warmup) -> float:
    from loom.training import Trainer, TrainerCallback, TrainingArguments

    clock = Clock(warmup)
    args = TrainingArguments(output_dir="/tmp/bench_loom_trainer", max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=LR, logging_steps=10**6, save_strategy="no", disable_tqdm=True,
                             optim="adamw_torch_fused", report_to="none")
    Trainer(loom_model(path), args, train_dataset=rows, callbacks=[clock_callback(TrainerCallback, clock)]).train()
    return clock.steps_per_second


def run_ref_trainer(path, rows, steps, warmup) -> float:
    import transformers

    clock = Clock(warmup)
    args = transformers.TrainingArguments(output_dir="/tmp/bench_ref_trainer", max_steps=steps,
                                          per_device_train_batch_size=BATCH, learning_rate=LR, logging_steps=10**6,
                                          save_strategy="no", disable_tqdm=True, optim="adamw_torch_fused",
                                          report_to="none", use_cpu=not torch.cuda.is_available())
    transformers.Trainer(ref_model(path), args, train_dataset=rows,
                         callbacks=[clock_callback(transformers.TrainerCallback, clock)]).train()
    return clock.steps_per_second


def run_hand_loop(model, rows, steps, warmup) -> float:
    """The loop a user would write: shuffled DataLoader, AdamW, clipping, linear decay."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).train()
    loader = torch.utils.data.DataLoader(rows, batch_size=BATCH, shuffle=True)
    # the Trainers' settings: fused AdamW, no weight decay (torch's AdamW defaults to 0.01), eps 1e-8
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, eps=1e-8, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (steps - s) / steps))
    clock = Clock(warmup)
    for step, batch in enumerate(loader, start=1):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_done(step)
        if step == steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock.steps_per_second


def _load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description="loom Trainer vs reference Trainer vs hand-written loop")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded MiniLM)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from loom.hub import packaged_model_dir

    path = opts.model or packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    rows = make_rows(opts.steps)
    # ABBA order, so a load that drifts during the run biases neither loom nor the reference
    runs = {
        "hand loop (loom model)": lambda: run_hand_loop(loom_model(path), rows, opts.steps, opts.warmup),
        "loom Trainer": lambda: run_loom_trainer(path, rows, opts.steps, opts.warmup),
        "reference Trainer": lambda: run_ref_trainer(path, rows, opts.steps, opts.warmup),
        "hand loop (reference model)": lambda: run_hand_loop(ref_model(path), rows, opts.steps, opts.warmup),
    }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"MiniLM-L6 sequence classification, batch {BATCH} x {LENGTH}, fp32, {opts.steps} steps "
          f"(timed after step {opts.warmup}), {device}")
    print("| run | steps/s | load average before, after |\n| --- | ---: | --- |", flush=True)
    results = {}
    for name, run in runs.items():
        before = _load_average()
        results[name] = run()
        print(f"| {name} | {results[name]:.3f} | {before}, {_load_average()} |", flush=True)
    loom_t, ref_t = results["loom Trainer"], results["reference Trainer"]
    print(f"\nloom Trainer / reference Trainer: {loom_t / ref_t:.3f}x (target >= 1.1x)")
    print(f"loom Trainer / hand loop (loom model): {loom_t / results['hand loop (loom model)']:.3f}x (target >= 0.97x)")
    print(f"reference Trainer / hand loop (reference model): "
          f"{ref_t / results['hand loop (reference model)']:.3f}x")


if __name__ == "__main__":
    main()
