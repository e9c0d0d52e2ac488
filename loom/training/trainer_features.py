"""Pieces of the Trainer that TrainingArguments switch on: label smoothing, NEFTune noise, input-token counting,
auto_find_batch_size's retries on out-of-memory, and the endless stream of batches an IterableDataset trains on."""
from __future__ import annotations

import warnings
from typing import Iterator

import torch
from torch import nn


def label_smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, epsilon: float, shift: bool,
                        num_items_in_batch=None) -> torch.Tensor:
    """(1 - epsilon) * NLL + epsilon * the mean over classes of -log p (the reference's LabelSmoother), over the
    labels that are not -100, divided by num_items_in_batch when given (the whole accumulated batch)."""
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    neg_log_probs = -nn.functional.log_softmax(logits, dim=-1)
    if labels.dim() == neg_log_probs.dim() - 1:
        labels = labels.unsqueeze(-1)
    ignored = labels.eq(-100)
    nll = neg_log_probs.gather(-1, labels.clamp(min=0)).masked_fill(ignored, 0.0)
    smooth = neg_log_probs.sum(-1, keepdim=True, dtype=torch.float32).masked_fill(ignored, 0.0)
    if num_items_in_batch is None:
        count = ignored.numel() - ignored.sum()
    else:
        count = num_items_in_batch.to(nll.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return (1 - epsilon) * nll.sum() / count + epsilon * smooth.sum() / (count * neg_log_probs.shape[-1])


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model's loss predicts the next token, so it drops the first label of each row (a compiled or
    PEFT-wrapped model answers for the model inside)."""
    from loom.adapters import unwrap_peft

    model = unwrap_peft(getattr(model, "_orig_mod", model))
    return bool(getattr(model, "can_generate", None) and model.can_generate())


def _neftune_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    # uniform noise of magnitude alpha / sqrt(T * D) (NEFTune, arXiv:2310.05914), in training mode only
    if module.training:
        # the bound in float32, as the reference computes it, so the same seed gives the same noise
        bound = float(module.neftune_noise_alpha / torch.tensor(float(output.size(1) * output.size(2))).sqrt())
        output = output + torch.zeros_like(output).uniform_(-bound, bound)
    return output


def add_neftune(model: nn.Module, alpha: float):
    """Add NEFTune noise to the model's input embeddings; returns the hook handle (remove() undoes it)."""
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"neftune_noise_alpha needs a model with input embeddings (get_input_embeddings); "
                         f"{type(model).__name__} has none")
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha
    return embeddings.register_forward_hook(_neftune_hook)


def count_input_tokens(batch: dict, mode: str, main_input_name: str, pad_token_id: int | None) -> int:
    """Tokens of one batch for state.num_input_tokens_seen: all of them, or with mode='non_padding' those the
    attention mask keeps (else those that are not the pad token)."""
    ids = batch.get(main_input_name)
    if ids is None:
        return 0
    if mode == "non_padding":
        if batch.get("attention_mask") is not None:
            return int(batch["attention_mask"].sum())
        if pad_token_id is not None:
            return int((ids != pad_token_id).sum())
    return ids.numel()


_OOM_MESSAGES = (" out of memory.", "MPS backend out of memory", "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
                 "DefaultCPUAllocator: can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """The errors after which auto_find_batch_size retries with a smaller batch (those the reference retries on)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and len(error.args) == 1 and \
        any(m in str(error.args[0]) for m in _OOM_MESSAGES)


def empty_device_cache(device: torch.device) -> None:
    """torch_empty_cache_steps: hand the accelerator's cached free memory back (nothing to do on the CPU)."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "empty_cache"):
        backend.empty_cache()


def train_finding_batch_size(trainer, resume, trial):
    """auto_find_batch_size: on out-of-memory, retry from the same start with 0.9x the batch size (the reference's
    rule). Each try starts from the weights and optimizer the call began with, so the result equals a run started
    with the batch size that fits."""
    weights = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    while True:
        try:
            return trainer._train_once(resume, trial)
        except Exception as e:
            size = trainer.args.per_device_train_batch_size
            if not is_out_of_memory(e):
                raise
            if int(size * 0.9) < 1:
                raise RuntimeError("auto_find_batch_size: out of memory even with per_device_train_batch_size=1") from e
            warnings.warn(f"auto_find_batch_size: out of memory with per_device_train_batch_size={size}; retrying "
                          f"with {int(size * 0.9)}", stacklevel=4)
            trainer.args = trainer.args.replace(per_device_train_batch_size=int(size * 0.9))
            trainer.model.load_state_dict(weights)
            trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
            empty_device_cache(trainer.args.device)


def endless_batches(loader, skip: int) -> Iterator:
    """Batches of an IterableDataset's loader, pass after pass (calling the dataset's set_epoch when it has one),
    after skipping the first `skip` batches of the stream (those a resumed run already trained on)."""
    passes = 0
    while True:
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(passes)
        produced = False
        for batch in loader:
            produced = True
            if skip:
                skip -= 1
                continue
            yield batch
        if not produced:
            raise ValueError("the training IterableDataset yields no examples; check that it is not empty or "
                             "already exhausted (it is iterated once per pass)")
        passes += 1
