"""LoRA fine-tuning throughput: loom's Trainer + peft on a loom model vs the reference's Trainer + peft on the
reference's model.

A ~100M-parameter Llama-shaped checkpoint (hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocabulary
32000, tied embeddings) is built randomly with the reference's config and saved once. Both sides wrap it with the same
LoraConfig (rank 16, alpha 32, no dropout, on q/k/v/o) whose initial adapter weights are copied from one side to the
other, train on the same token rows in the same (sequential) order with bf16 autocast, AdamW and a linear schedule,
and log every step's loss. Each run is a fresh child process (so peak memory is the run's own: CUDA's peak allocation
on a GPU, the process's peak RSS on the CPU); runs alternate loom / reference. steps/s is timed after the warm-up
steps. Prints one row per run and the ratio of the medians.

    python bench/bench_lora.py [--steps 20] [--warmup 3] [--seq 256] [--batch 4] [--repeats 2] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
              intermediate_size=2048, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
              eos_token_id=2)
LORA = dict(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def build_checkpoint(directory: str) -> None:
    """The random base model and the initial adapter weights both sides start from."""
    import peft
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.save_pretrained(directory)
    adapter = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    save_file({k: v.contiguous() for k, v in peft.get_peft_model_state_dict(adapter).items()},
              os.path.join(directory, "adapter_init.safetensors"))


def rows(n: int, length: int) -> list[dict]:
    ids = torch.randint(3, CONFIG["vocab_size"], (n, length), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


class StepClock:
    """Wall time from the end of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def __call__(self, step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step == self.warmup:
            self.start = time.perf_counter()
        self.end, self.steps = time.perf_counter(), step - self.warmup


def one_run(side: str, directory: str, opts) -> dict:
    """Train one side in this process; returns steps/s, per-step losses and peak memory."""
    import peft
    from safetensors.torch import load_file

    if side == "loom":
        import loom as lib
        from loom.training.data import EpochSampler

        class Sequential(lib.Trainer):
            def _train_sampler(self, dataset):
                return EpochSampler(len(dataset), self.args.seed, shuffle=False)

        trainer_class, extra = Sequential, {}
    else:
        import transformers as lib

        trainer_class, extra = lib.Trainer, {"train_sampling_strategy": "sequential"}
    model = peft.get_peft_model(lib.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig(**LORA))
    peft.set_peft_model_state_dict(model, load_file(os.path.join(directory, "adapter_init.safetensors")))
    clock = StepClock(opts.warmup)

    class Timing(lib.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock(state.global_step)

    args = lib.TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=opts.steps,
                                 per_device_train_batch_size=opts.batch, learning_rate=2e-4, bf16=True,
                                 logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                                 use_cpu=not torch.cuda.is_available(), **extra)
    trainer = trainer_class(model=model, args=args, train_dataset=rows(opts.steps * opts.batch, opts.seq),
                            callbacks=[Timing()])
    trainer.train()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"steps_per_second": clock.steps / (clock.end - clock.start), "peak_mib": peak,
            "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log]}


def child(side: str, directory: str, opts) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--dir", directory, "--steps", str(opts.steps),
           "--warmup", str(opts.warmup), "--seq", str(opts.seq), "--batch", str(opts.batch)]
    if opts.threads:
        cmd += ["--threads", str(opts.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the {side} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="LoRA fine-tuning: loom Trainer + peft vs reference Trainer + peft")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", choices=["loom", "reference"], default=None)
    parser.add_argument("--dir", default=None)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.child:
        print(json.dumps(one_run(opts.child, opts.dir, opts)))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(directory)
        print(f"LoRA r=16 on q/k/v/o, ~100M Llama, batch {opts.batch} x {opts.seq}, bf16 autocast, {opts.steps} "
              f"steps (timed after step {opts.warmup}), {device}", flush=True)
        results: dict[str, list[dict]] = {"loom": [], "reference": []}
        for i in range(opts.repeats):
            for side in ("loom", "reference") if i % 2 == 0 else ("reference", "loom"):
                r = child(side, directory, opts)
                results[side].append(r)
                print(f"{side:10s} {r['steps_per_second']:7.3f} steps/s  peak {r['peak_mib']:8.0f} MiB  "
                      f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}", flush=True)
    speed = {side: statistics.median(r["steps_per_second"] for r in runs) for side, runs in results.items()}
    diff = max(abs(a - b) for a, b in zip(results["loom"][0]["losses"], results["reference"][0]["losses"]))
    print(f"loom / reference steps/s (medians): {speed['loom'] / speed['reference']:.2f}x; "
          f"largest step-loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
