"""What a new user runs under `torchrun --nproc_per_node 2`: load with tp_plan="auto" and run inference with loom's
kernels on (one forward, greedy generate, a forward under FakeTensorMode, Trainer.evaluate). Rank 0 saves the results
to OUT_DIR/tp_inference.pt; the pytest side compares them with one process. `python tp_inference_script.py X OUT CKPT`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loom import LlamaForCausalLM, Trainer, TrainingArguments

torch.set_num_threads(2)  # several threads: the kernels' pool runs on every rank


def main() -> None:
    out, ckpt = Path(sys.argv[2]), sys.argv[3]
    model = LlamaForCausalLM.from_pretrained(ckpt, tp_plan="auto").eval()
    ids = torch.tensor([[1, 5, 9, 3, 7, 11], [1, 8, 2, 6, 4, 10]])
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        fake_shape = tuple(model(torch.empty(1, 4, dtype=torch.long)).logits.shape)
    data = [{"input_ids": row, "labels": row} for row in ids]
    try:  # a run that does not say tp_size=2 must say so, not hang in a collective of mismatched shards
        Trainer(model=model, args=TrainingArguments(output_dir=str(out / "t1"), report_to=[]), eval_dataset=data)
        mismatch = "no error"
    except ValueError as e:
        mismatch = str(e)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_eval_batch_size=2, report_to=[], tp_size=2)
    metrics = Trainer(model=model, args=args, eval_dataset=data).evaluate()
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "tokens": tokens, "fake_shape": fake_shape, "eval_loss": metrics["eval_loss"],
                    "mismatch": mismatch}, out / "tp_inference.pt")
    dist.barrier()
    dist.destroy_process_group()  # leave together: a gloo group alive at exit can abort in its destructor


if __name__ == "__main__":
    main()
