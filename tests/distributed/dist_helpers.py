"""Shared by the multi-process tests and their workers: a tiny Llama, a dataset, the training loop, the launcher.

The training loop is the same code in one process (the reference) and under torchrun-style launches, so a
difference in losses can only come from the parallel machinery.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

TINY_LLAMA = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
TINY_GPT2 = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, type_vocab_size=2)
SEQ_LEN = 16
LR = 5e-3
MAX_NORM = 0.5


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    from loom.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    model.save_pretrained(path)
    return path


def make_family_checkpoints(root: Path) -> tuple[Path, Path]:
    """A tiny GPT-2 LM (tied head, transposed Conv1D weights on disk) and a tiny BERT encoder, saved by loom."""
    from loom.models.bert import BertConfig, BertModel
    from loom.models.gpt2 import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).save_pretrained(root / "gpt2")
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(root / "bert")
    return root / "gpt2", root / "bert"


def family_outputs(gpt2_path, bert_path, **kwargs) -> dict[str, torch.Tensor]:
    """GPT-2 logits and BERT hidden states on a fixed input, loaded with `kwargs` (e.g. a tp_plan)."""
    from loom.models.bert import BertModel
    from loom.models.gpt2 import GPT2LMHeadModel

    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    gpt2 = GPT2LMHeadModel.from_pretrained(gpt2_path, **kwargs)
    bert = BertModel.from_pretrained(bert_path, **kwargs)
    with torch.no_grad():
        return {"gpt2": gpt2(ids, use_cache=False).logits, "bert": bert(ids, attention_mask=mask).last_hidden_state}


def load_model(path, **kwargs):
    from loom.models.llama import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, **kwargs).train()


def dataset(n: int, seq_len: int = SEQ_LEN, seed: int = 1) -> list[dict]:
    """Random sequences whose labels hide a random-length prefix, so token counts differ between samples."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, TINY_LLAMA["vocab_size"], (seq_len,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, seq_len // 2, (1,), generator=g))] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def train(ctx, model, optimizer, data: list[dict], steps: range, micro_batch: int, accum: int = 1) -> list[float]:
    """Optimizer steps over `data` in sampler order; returns the global mean loss of each step."""
    order = list(ctx.sampler(data, shuffle=False))
    losses = []
    for step in steps:
        micro = [collate([data[i] for i in order[(step * accum + a) * micro_batch:(step * accum + a + 1) * micro_batch]])
                 for a in range(accum)]
        losses.append(float(ctx.train_step(model, optimizer, micro, MAX_NORM)))
    return losses


def optimizer_for(model):
    # A large eps keeps Adam well-conditioned for near-zero gradients, where its update is otherwise +-lr whatever the
    # sign of 1e-9 of reduction-order noise; parameters can then be compared tightly, not only losses.
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, eps=1e-3)


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full tensor (DTensors gathered); call on every rank."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def full_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for k, p in model.named_parameters() if p.grad is not None}


# -- launching ----------------------------------------------------------------------------------------------------------
class LaunchError(AssertionError):
    pass


def launch(world_size: int, out_dir: Path, suite: str, *args: str, timeout: float = 150.0,
           dist_timeout: float = 30.0, check: bool = True, script: str = "worker.py"
           ) -> list[subprocess.CompletedProcess]:
    """Run tests/distributed/<script> as `world_size` ranks with torchrun's environment variables.

    Every rank is killed once `timeout` seconds have passed (its returncode is then -9); returns each rank's result
    (returncode, stdout). With `check`, raises LaunchError naming the ranks that failed or hung, with their output.
    """
    from loom.distributed.launch import check_ranks, launch_local

    env = {"LOOM_DIST_TIMEOUT": str(dist_timeout),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    results = launch_local(world_size, [HERE / script, suite, out_dir, *args], env=env, timeout=timeout,
                           log_dir=out_dir, name=suite, cwd=ROOT)
    if check:
        try:
            check_ranks(results, f"{suite} at world size {world_size}")
        except RuntimeError as e:
            raise LaunchError(str(e)) from None
    return results
