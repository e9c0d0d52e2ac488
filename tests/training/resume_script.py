"""A training run for the resume tests, run as a subprocess so that it can be killed with SIGKILL.

usage: resume_script.py OUTPUT_DIR [--kill-at-step N] [--kill-while-saving N] [--resume]
Every log line is printed as JSON (flushed) so the parent sees the losses of a run that gets killed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
torch.set_num_threads(1)

from loom.training import Trainer, TrainerCallback  # noqa: E402
from tests.training.conftest import cls_rows, resume_args, tiny_bert  # noqa: E402


class Report(TrainerCallback):
    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            print("LOSS", json.dumps({"step": state.global_step, "loss": logs["loss"]}), flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-while-saving", type=int)
    parser.add_argument("--resume", action="store_true")
    opts = parser.parse_args()
    trainer = Trainer(tiny_bert(hidden_dropout_prob=0.1), resume_args(opts.output_dir), train_dataset=cls_rows(20),
                      callbacks=[Report(opts.kill_at_step)])
    if opts.kill_while_saving:
        write = trainer._write_checkpoint_files

        def write_then_die(folder):
            write(folder)
            if trainer.state.global_step == opts.kill_while_saving:
                os.kill(os.getpid(), signal.SIGKILL)  # every file is written, the folder is not yet renamed

        trainer._write_checkpoint_files = write_then_die
    trainer.train(resume_from_checkpoint=True if opts.resume else None)


if __name__ == "__main__":
    main()
