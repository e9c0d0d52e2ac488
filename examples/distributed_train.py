"""One training script for one process and for torchrun: data, tensor or context parallel
(docs/guides/distributed.md).

    python examples/distributed_train.py                                   # one process
    torchrun --nproc_per_node 2 examples/distributed_train.py              # replicated data parallel
    torchrun --nproc_per_node 2 examples/distributed_train.py --fsdp       # FSDP2: state sharded 1/N
    torchrun --nproc_per_node 2 examples/distributed_train.py --tp 2       # tensor parallel
    torchrun --nproc_per_node 2 examples/distributed_train.py --cp 2       # context parallel (long sequences)

Under torchrun the same Trainer shards the model (trainer.parallel): gradients synchronised, losses reported
as the global mean on every rank. CPU runs use the gloo backend, GPU runs NCCL (one GPU per process).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from loom import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

SEQ = 32  # context parallel needs a multiple of 2 x cp (zig-zag chunks)


def dataset(n: int, vocab: int) -> list[dict]:
    """Sequences following next = 3*prev + 1 (mod vocab): learnable, so the loss falls."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = [int(torch.randint(0, vocab, (1,), generator=g))]
        while len(ids) < SEQ:
            ids.append((3 * ids[-1] + 1) % vocab)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // (args.tp * args.cp)  # processes left for data parallel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=8 // dp, learning_rate=3e-3,
            logging_steps=2, save_strategy="no", report_to="none", disable_tqdm=True, optim="adamw_torch",
            tp_size=args.tp, cp_size=args.cp, fsdp=args.fsdp)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset(64, 128))
        result = trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
    sizes = trainer.parallel.dims
    # one write of the whole line: the ranks share one stdout, and print's separate write of the newline let
    # another rank's output land in the middle of a line
    sys.stdout.write(f"rank {rank}/{world} (mesh world={sizes.world_size}, tp={sizes.tp} cp={sizes.cp} "
                     f"fsdp={args.fsdp}): losses {losses}, train_loss {result.training_loss:.3f}\n")
    sys.stdout.flush()
    assert losses[-1] < losses[0]


if __name__ == "__main__":
    main()
