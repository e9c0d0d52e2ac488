"""Runs the model for generation: one prefill over the prompt, then one forward per new token.

Everything a step needs is prepared once: the cache, a position table, and (only for padded batches) a full-length
attention mask and position-id buffer, so a decode step is a single model call on views, with no per-step
allocation of masks or positions. Without padding no mask is passed at all, so the attention takes its mask-free
path. Only the last position's logits are computed (`logits_to_keep=1`).
"""
from __future__ import annotations

import contextlib

import torch

from loom.kernels import policy, threads
from loom.models.cache import DynamicCache, StaticCache


class Decoder:
    """Model stepping state for `rows` sequences whose prompts fill the first `prompt_positions` positions."""

    def __init__(self, model, *, rows: int, prompt_positions: int, total_positions: int, attention_mask,
                 position_ids, use_cache: bool, cache_implementation: str | None, output_hidden_states: bool,
                 compile: bool = False) -> None:
        device = model.device
        self.model = model
        self.use_cache = use_cache
        self.n = prompt_positions  # positions consumed so far
        self.output_hidden_states = output_hidden_states
        self.positions = torch.arange(total_positions, device=device)
        self.cache = None
        # A static cache attends over its whole buffer, so it takes the whole mask: one shape at every step (a
        # compiled step would otherwise recompile for each length of a sliced mask).
        self.whole_mask = use_cache and cache_implementation == "static"
        if use_cache:
            if self.whole_mask:
                # the last generated token is never fed back, so total_positions - 1 slots suffice
                self.cache = StaticCache(model.config, max_batch_size=rows, max_cache_len=max(total_positions - 1, 1),
                                         device=device, dtype=model.dtype)
            else:
                self.cache = DynamicCache()
        self.mask = self.position_ids = None
        if attention_mask is not None:  # padded batch: full-length buffers, sliced as views each step
            self.mask = torch.ones(rows, total_positions, dtype=attention_mask.dtype, device=device)
            self.mask[:, :prompt_positions] = attention_mask
            self.position_ids = torch.empty(rows, total_positions, dtype=torch.long, device=device)
            self.position_ids[:, :prompt_positions] = position_ids
            steps = torch.arange(1, total_positions - prompt_positions + 1, device=device)
            self.position_ids[:, prompt_positions:] = position_ids[:, -1:] + steps
        self.forward = model
        self.rows = rows
        if compile:
            self.forward = torch.compile(model, dynamic=False)

    def stepping(self):
        """Context for the decode loop: where loom's C kernels carry every matmul of a step, torch's own small ops
        run on one thread meanwhile (`loom.kernels.threads`); otherwise nothing changes."""
        if self.use_cache and self.forward is self.model and policy.decode_on_kernels(self.model, self.rows):
            return threads.kernels_own_threads()
        return contextlib.nullcontext()

    def _run(self, forward, start: int, end: int, **inputs) -> torch.Tensor:
        out = forward(
            attention_mask=self.mask if self.mask is None or self.whole_mask else self.mask[:, :end],
            position_ids=None if self.position_ids is None else self.position_ids[:, start:end],
            past_key_values=self.cache, use_cache=self.use_cache, cache_position=self.positions[start:end],
            output_hidden_states=self.output_hidden_states or None, logits_to_keep=1, **inputs)
        self.last_hidden_states = out.hidden_states
        return out.logits[:, -1]

    def prefill(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (rows, V) for the token after the prompt."""
        if inputs_embeds is not None:
            return self._run(self.model, 0, self.n, inputs_embeds=inputs_embeds)
        return self._run(self.model, 0, self.n, input_ids=input_ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the newest token of `tokens` (rows, T); return logits (rows, V) for the one after it."""
        n = self.n
        self.n = n + 1
        if self.use_cache:
            return self._run(self.forward, n, n + 1, input_ids=tokens[:, -1:])
        # without a cache the whole sequence is recomputed (the reference's use_cache=False behaviour)
        return self._run(self.forward, 0, n + 1, input_ids=tokens)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i continues from row beam_idx[i]."""
        if self.cache is not None:
            self.cache.reorder_cache(beam_idx)
