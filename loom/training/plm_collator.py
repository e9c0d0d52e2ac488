"""XLNet's permutation language modelling batches: span masking plus a random factorisation order."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loom.training.collators import _pad_ids, as_framework, check_return_tensors


@dataclass
class DataCollatorForPermutationLanguageModeling:
    """Pads the examples, then per row: masks spans of 1..max_span_length tokens, one per context of
    span / plm_probability tokens (special and padding tokens never); `perm_mask[i, j, k] = 1` when token j may
    not see token k under a random factorisation order that keeps each half-sequence pair together;
    `target_mapping` is the identity. Draws come from torch's global generator, in the reference's order, so a
    seeded run gives the reference's batch. Sequence lengths must be even."""

    tokenizer: Any
    plm_probability: float = 1 / 6
    max_span_length: int = 5
    return_tensors: str = "pt"

    def __call__(self, examples: list) -> dict[str, Any]:
        check_return_tensors(self.return_tensors)
        if isinstance(examples[0], Mapping):
            examples = [e["input_ids"] for e in examples]
        inputs = _pad_ids(examples, self.tokenizer.pad_token_id, None, getattr(self.tokenizer, "padding_side", "right"))
        if self.tokenizer.mask_token is None:
            raise ValueError("permutation language modelling needs a tokenizer with a mask token")
        if inputs.shape[1] % 2:
            raise ValueError(f"permutation language modelling needs an even sequence length (got {inputs.shape[1]}) "
                             "so that its permutation mask cannot leak; pad or cut the examples to an even length")
        masked = self._span_mask(inputs)
        labels = inputs.masked_fill(~masked, -100)
        inputs = inputs.masked_fill(masked, self.tokenizer.mask_token_id)
        batch = {"input_ids": inputs.long(), "perm_mask": self._perm_mask(masked, self._functional),
                 "target_mapping": torch.eye(inputs.shape[1]).expand(inputs.shape[0], -1, -1).clone(),
                 "labels": labels.long()}
        return as_framework(batch, self.return_tensors)

    def _span_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        rows, length = inputs.shape
        masked = torch.zeros(rows, length, dtype=torch.bool)
        for i in range(rows):
            start_of_context = 0
            while start_of_context < length:
                span = torch.randint(1, self.max_span_length + 1, (1,)).item()
                context = int(span / self.plm_probability)
                start = start_of_context + torch.randint(context - span + 1, (1,)).item()
                masked[i, start:start + span] = True
                start_of_context += context
        special = torch.tensor([self.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                                for row in inputs.tolist()], dtype=torch.bool)
        padding = inputs == self.tokenizer.pad_token_id if self.tokenizer.pad_token is not None \
            else torch.zeros_like(special)
        self._functional = ~(special | padding)
        return masked & self._functional

    @staticmethod
    def _perm_mask(masked: torch.Tensor, functional: torch.Tensor) -> torch.Tensor:
        rows, length = masked.shape
        out = torch.zeros(rows, length, length)
        for i in range(rows):
            order = torch.arange(length).reshape(-1, length // 2).T  # (length/2, 2): pairs (k, k + length/2)
            order = order[torch.randperm(length // 2)].T.flatten()
            order = order.masked_fill(~masked[i] & functional[i], -1)  # unmasked tokens come first: seen by all
            out[i] = (order[:, None] <= order[None, :]) & masked[i]
        return out
