"""Resume scenarios of the Trainer under torchrun, one rank each (tests/distributed/test_parallel_trainer.py launches them).

    python parallel_resume_script.py extend OUT CKPT MODE           # to 8 steps; to 4 (or 1 epoch) then resumed to 8
    python parallel_resume_script.py continue OUT CKPT MODE FROM    # resume FROM at this world size (1 first, then N)

Every run keeps a global batch of 4 examples (per-device batch 4 // data-parallel ranks) over 16 examples: 4 steps per
epoch. Rank 0 writes OUT/<scenario>_w<world size>.json: each run's logged losses and final step, and the message of a
resume that must fail.
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

torch.set_num_threads(1)
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


def run(out: Path, ckpt: str, mode: str, resume: str | bool | None = None, global_batch: int = 4, **lengths) -> dict:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=global_batch // WORLD,
                             learning_rate=5e-3, adam_epsilon=1e-3, logging_steps=1, save_steps=4,
                             lr_scheduler_type="constant", report_to="none", disable_tqdm=True, seed=7,
                             max_grad_norm=0.5, fsdp=mode == "fsdp", **{"max_steps": 8, **lengths})
    trainer = Trainer(model=H.load_model(ckpt), args=args, train_dataset=H.dataset(16))
    trainer.train(resume_from_checkpoint=resume)
    return {"losses": {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e},
            "step": trainer.state.global_step}


def extend(out: Path, ckpt: str, mode: str) -> dict:
    result = {"full": run(out / "full", ckpt, mode)}
    run(out / "steps", ckpt, mode, max_steps=4)
    result["steps"] = run(out / "steps", ckpt, mode, resume=True)
    epochs = dict(max_steps=-1, save_strategy="epoch")
    run(out / "epochs", ckpt, mode, num_train_epochs=1, **epochs)
    result["epochs"] = run(out / "epochs", ckpt, mode, resume=True, num_train_epochs=2, **epochs)
    return result


def resume_elsewhere(out: Path, ckpt: str, mode: str, source: str) -> dict:
    result = {"refused": _refusal(ValueError, out, ckpt, mode, source, global_batch=8)}  # another global batch
    plain = str(out / "continued_w1" / "checkpoint-8")  # written by the one-process run (no dcp/ folder)
    if WORLD > 1:  # it cannot go into sharded parameters...
        result["plain_refused"] = _refusal(FileNotFoundError, out, ckpt, mode, plain)
    result["continued"] = run(out / f"continued_w{WORLD}", ckpt, mode, resume=source)
    # ...but into replicated ones (plain data parallel) it can: two more steps from it, in each world size
    result["beyond"] = run(out / f"beyond_w{WORLD}", ckpt, "dp", resume=plain, max_steps=10)
    return result


def _refusal(error: type, out: Path, ckpt: str, mode: str, source: str, **kwargs) -> str | None:
    try:
        run(out / f"refused_w{WORLD}", ckpt, mode, resume=source, **kwargs)
    except error as e:
        return str(e)
    return None


def main() -> None:
    scenario, out, ckpt, mode, *rest = sys.argv[1:]
    out = Path(out)
    result = extend(out, ckpt, mode) if scenario == "extend" else resume_elsewhere(out, ckpt, mode, *rest)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / f"{scenario}_w{WORLD}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()  # leave together: a gloo group alive at exit can abort in its destructor


if __name__ == "__main__":
    main()
