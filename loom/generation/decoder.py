"""Runs the model for generation: one prefill over the prompt, then one forward per new token.

Everything a step needs is prepared ahead: the cache, a position table, and (only for padded batches) an attention
mask and position-id buffer, so a decode step is a single model call on views, with no per-step allocation of masks
or positions. The buffers grow by doubling as tokens are generated (capped at the total), so a generate whose
max_length is huge but stops early holds what it used, not what it might have used. Without padding no mask is passed
at all, so the attention takes its mask-free path. Only the last position's logits are computed (`logits_to_keep=1`).
"""
from __future__ import annotations

import contextlib

import torch

from loom.generation.decode_plan import DecodePlan
from loom.kernels import policy, threads
from loom.models.cache import DynamicCache, StaticCache

FIRST_CAPACITY = 64  # positions reserved past the prompt before the first doubling


def grown(buffer: torch.Tensor, needed: int, limit: int, fill: int = 0) -> torch.Tensor:
    """`buffer` (..., n) copied into one of at least `needed` and twice n columns along its last dim, at most `limit`;
    the new columns hold `fill`. Doubling keeps the copies O(1) per appended column, amortised."""
    width = min(limit, max(needed, 2 * buffer.shape[-1]))
    out = buffer.new_full((*buffer.shape[:-1], width), fill)
    out[..., :buffer.shape[-1]] = buffer
    return out


class Decoder:
    """Model stepping state for `rows` sequences whose prompts fill the first `prompt_positions` positions, which may
    run to `total_positions`."""

    def __init__(self, model, *, rows: int, prompt_positions: int, total_positions: int, attention_mask,
                 position_ids, use_cache: bool, cache_implementation: str | None, output_hidden_states: bool,
                 output_attentions: bool = False, compile: bool = False, token_type_ids=None, cache=None) -> None:
        device = model.device
        self.model = model
        self.use_cache = use_cache
        self.n = prompt_positions  # positions consumed so far
        self.rows, self.prompt_positions, self.total = rows, prompt_positions, total_positions
        self.output_hidden_states, self.output_attentions = output_hidden_states, output_attentions
        self.cache = None
        self.plan = None  # the decode plan (decode_plan.py), built at the first decode step; False: none applies
        self.quiet = False  # set by the generate loop: it runs only loom's code between steps (decode_plan.py)
        # a model whose cached keys go stale at some length (Phi-3's longrope) says where; the step that reaches it
        # starts a new cache and re-reads the whole sequence, as the reference's generate does for that model
        self.restart_at = getattr(model, "cache_restart_length", None)
        self.tokens_known = True  # False after a prefill from inputs_embeds: the prompt cannot be re-read as tokens
        # A static cache attends over its whole buffer, so it takes the whole mask: one shape at every step (a
        # compiled step would otherwise recompile for each length of a sliced mask).
        self.whole_mask = use_cache and cache_implementation == "static" and cache is None
        # a cache the caller passed: its first `cached` positions are the prompt's, already run
        self.cached = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            self.cache = cache
        elif use_cache:
            if self.whole_mask:
                # the last generated token is never fed back, so total_positions - 1 slots suffice
                self.cache = StaticCache.whole_sequence(model.config, max_batch_size=rows,
                                                        max_cache_len=max(total_positions - 1, 1), device=device,
                                                        dtype=model.dtype)
            else:
                self.cache = DynamicCache()
        # padded batch: the prompt's mask and positions, extended as `_reserve` grows them
        self.mask = None if attention_mask is None else attention_mask.to(device)
        self.position_ids = None if attention_mask is None else position_ids.to(device)
        self.positions = torch.arange(0, device=device)
        self.types = None if token_type_ids is None else token_type_ids.to(device)  # (rows, prompt) segment ids
        self._reserve(total_positions if self.whole_mask else prompt_positions + FIRST_CAPACITY)
        self.forward = model
        if compile:
            self.forward = torch.compile(model, dynamic=False)

    def _reserve(self, end: int) -> None:
        """Make the position table (and a padded batch's mask and position ids) cover positions [0, end): grown to
        at least double, capped at the total, so growing costs O(1) per step amortised."""
        have = self.positions.shape[0]
        if end <= have:
            return
        cap = min(self.total, max(end, 2 * have))
        self.positions = torch.arange(cap, device=self.positions.device)
        if self.mask is not None:
            width = self.mask.shape[1]
            self.mask = grown(self.mask, cap, cap, fill=1)
            # generated tokens continue each row's positions from its last prompt token
            steps = torch.arange(width, cap, device=self.mask.device) - self.prompt_positions + 1
            last_prompt = self.position_ids[:, self.prompt_positions - 1:self.prompt_positions]
            self.position_ids = torch.cat((self.position_ids, last_prompt + steps), 1)
        if self.types is not None:  # generated tokens keep the prompt's last segment id, as in the reference
            self.types = torch.cat((self.types, self.types[:, -1:].expand(-1, cap - self.types.shape[1])), 1)

    def stepping(self):
        """Context for the decode loop: where loom's C kernels carry every matmul of a step, torch's own small ops
        run on one thread meanwhile (`loom.kernels.threads`); otherwise nothing changes."""
        if self.use_cache and self.forward is self.model and policy.decode_on_kernels(self.model, self.rows):
            return threads.kernels_own_threads()
        return contextlib.nullcontext()

    def _run(self, forward, start: int, end: int, **inputs) -> torch.Tensor:
        self._reserve(end)
        out = forward(
            attention_mask=self.mask if self.mask is None or self.whole_mask else self.mask[:, :end],
            position_ids=None if self.position_ids is None else self.position_ids[:, start:end],
            past_key_values=self.cache, use_cache=self.use_cache, cache_position=self.positions[start:end],
            output_hidden_states=self.output_hidden_states or None, output_attentions=self.output_attentions or None,
            logits_to_keep=1, **inputs, **self._types(start, end))
        self.last_hidden_states, self.last_attentions = out.hidden_states, out.attentions
        return out.logits[:, -1]

    def _types(self, start: int, end: int) -> dict:
        return {} if self.types is None else {"token_type_ids": self.types[:, start:end]}

    def prefill(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (rows, V) for the token after the prompt. Where loom's kernels carry every matmul of it (quantized
        Linears' blocked GEMMs, the mask-free attention), torch's own ops run on one thread meanwhile, as in decode."""
        start = self.cached
        with self._prefilling(self.n - start):
            if inputs_embeds is not None:
                self.tokens_known = False
                return self._run(self.model, start, self.n, inputs_embeds=inputs_embeds[:, start:])
            return self._run(self.model, start, self.n, input_ids=input_ids[:, start:])

    def _prefilling(self, length: int):
        # a whole prompt without padding over a dynamic (or no) cache: its attention is loom::flash_attention's;
        # a padded, static-cache or continued prefill attends through SDPA with a mask, which wants torch's threads
        if (self.mask is None and self.cached == 0 and not self.whole_mask and self.forward is self.model
                and policy.prefill_on_kernels(self.model, self.rows * length, self.rows)):
            return threads.kernels_own_threads()
        return contextlib.nullcontext()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the newest token of `tokens` (rows, T); return logits (rows, V) for the one after it."""
        n = self.n
        self.n = n + 1
        if self.use_cache and n == self.restart_at and self.tokens_known:
            if isinstance(self.cache, StaticCache):
                self.cache.reset()
            else:
                self.cache = DynamicCache()
            return self._run(self.model, 0, n + 1, input_ids=tokens)
        if self.use_cache:
            if self.plan is None and self.forward is self.model and self.types is None and self.restart_at is None \
                    and not (self.output_hidden_states or self.output_attentions):
                self.plan = DecodePlan.build(self.model, self.cache, self.rows) or False
            if self.plan:
                self._reserve(n + 1)
                positions = (self.positions[n:n + 1][None].expand(self.rows, 1) if self.position_ids is None
                             else self.position_ids[:, n:n + 1])
                logits = self.plan.step(tokens[:, -1:], positions, self.positions[n:n + 1], n, self.mask, self.quiet)
                if logits is not None:
                    self.last_hidden_states = self.last_attentions = None
                    return logits
            return self._run(self.forward, n, n + 1, input_ids=tokens[:, -1:])
        # without a cache the whole sequence is recomputed (the reference's use_cache=False behaviour)
        return self._run(self.forward, 0, n + 1, input_ids=tokens)

    def run_greedy(self, seqs: torch.Tensor, cur: int, eos: torch.Tensor) -> int:
        """Greedy tokens for one unpadded row written to seqs[0, cur:] by the decode plan in runs of one C call
        (DecodePlan.greedy), from the newest token seqs[0, cur - 1]: for a quiet generate whose plan runs. Returns
        how many (0: none; the caller steps as before)."""
        if not (self.plan and self.quiet and self.use_cache and self.rows == 1 and self.mask is None
                and self.position_ids is None and self.forward is self.model and self.restart_at is None):
            return 0
        got = self.plan.greedy(seqs, cur, self.n, eos)
        self.n += got
        if got:
            self.last_hidden_states = self.last_attentions = None
        return got

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i continues from row beam_idx[i]."""
        if self.cache is not None:
            self.cache.reorder_cache(beam_idx)
