"""A user's training script: the same file runs with `python` and under torchrun (see test_trainer.py).

    python train_script.py NAME OUT_DIR CKPT [fsdp|tp|lora]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dist_helpers as H
from loom import Trainer, TrainingArguments


def run(out: Path, ckpt: str, mode: str, resume: str | None = None, seed_model: bool = True):
    tp = 2 if mode == "tp" else 1
    dp = int(os.environ.get("WORLD_SIZE", "1")) // tp
    model = H.load_model(ckpt)
    if mode == "lora":  # peft's LoRA on q/v: only the adapters train, the same way in one process and on every rank
        import peft

        torch.manual_seed(3)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
        model = peft.get_peft_model(model, config)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4 // dp, max_steps=4,
                             learning_rate=5e-3, adam_epsilon=1e-3, logging_steps=1, save_steps=2,
                             lr_scheduler_type="constant", optim="adamw_torch", report_to="none", disable_tqdm=True,
                             seed=7, max_grad_norm=0.5, tp_size=tp, fsdp=mode == "fsdp")
    trainer = Trainer(model=model, args=args, train_dataset=H.dataset(16))  # sharded over the mesh under torchrun
    trainer.train(resume_from_checkpoint=resume)
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def main() -> None:
    name, out, ckpt = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "none"
    run_dir = out / f"{name}_run"
    losses = run(run_dir, ckpt, mode)
    resumed = run(run_dir, ckpt, mode, resume=str(run_dir / "checkpoint-2"))
    from loom.distributed.mesh import env_world

    if env_world()[0] == 0:
        (out / f"{name}.json").write_text(json.dumps({"losses": losses, "resumed": resumed}))
    if dist.is_initialized():
        dist.destroy_process_group()  # leave together: a gloo group alive at exit can abort in its destructor


if __name__ == "__main__":
    main()
