"""Tiny models and datasets for the Trainer tests (random weights, built in memory: no files, no reference)."""
from __future__ import annotations

import pytest
import torch

from tests.loomtest import TINY


def tiny_llama(seed: int = 0, **overrides):
    from loom.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY["llama"], **overrides}))


def tiny_bert(head: str = "BertForSequenceClassification", seed: int = 0, **overrides):
    import loom.models.bert as bert

    torch.manual_seed(seed)
    config = bert.BertConfig(**{**TINY["bert"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                **overrides})
    return getattr(bert, head)(config)


def lm_rows(n: int = 24, seed: int = 1, min_len: int = 5, max_len: int = 12, vocab: int = 99) -> list[dict]:
    """Token sequences of varying length; labels equal inputs (the causal-LM convention)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": list(ids)})
    return rows


def cls_rows(n: int = 32, seed: int = 2, length: int = 8, vocab: int = 99) -> list[dict]:
    """An easy classification task: label 1 sequences draw tokens from the lower half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    half = vocab // 2
    for i in range(n):
        low, high = (3, half) if i % 2 else (half, vocab)
        ids = torch.randint(low, high, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "label": i % 2})
    return rows


class PadCollator:
    """Pads token lists to the batch's longest with id 0 (mask 0) and labels with -100; no tokenizer needed."""

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = length - len(f["input_ids"])
            out["input_ids"].append(list(f["input_ids"]) + [0] * pad)
            out["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
            out["labels"].append(list(f["labels"]) + [-100] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}


@pytest.fixture(autouse=True)
def _one_thread_here(one_thread):
    """One intra-op thread: these tiny models gain nothing from more, and a shared CPU punishes spinning threads."""


@pytest.fixture
def args_for(tmp_path):
    """TrainingArguments with quiet, test-friendly defaults pointing into tmp_path."""
    from loom.training import TrainingArguments

    def make(**kwargs):
        base = dict(output_dir=str(tmp_path / "out"), disable_tqdm=True, logging_steps=1, save_strategy="no",
                    report_to="none", learning_rate=1e-2)
        return TrainingArguments(**{**base, **kwargs})

    return make


def resume_args(output_dir: str, **overrides):
    """20 examples, batch 3, accumulation 3: windows of 3, 3 and 1 batches per epoch, checkpoints every 2 steps."""
    from loom.training import TrainingArguments

    # bit-exact replay is promised on the CPU (GPU kernels such as the embedding backward may use atomics)
    return TrainingArguments(**{**dict(output_dir=output_dir, use_cpu=True, disable_tqdm=True, logging_steps=1,
                                       save_steps=2, max_steps=8, per_device_train_batch_size=3,
                                       gradient_accumulation_steps=3, learning_rate=3e-3, warmup_steps=2,
                                       weight_decay=0.1, report_to="none"), **overrides})
