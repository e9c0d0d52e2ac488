"""Beam search (and beam sampling) on fixed-shape tensors, following the reference's vectorised algorithm step for
step so that the chosen tokens are identical.

Per batch item we keep `num_beams` running hypotheses and `num_beams` finished ones. Each step takes the best
K = max(2, 1 + #eos) * num_beams continuations over all running beams, so that even if the top ones all end, enough
unfinished ones remain to continue. Finished candidates compete on log-prob / generated_length ** length_penalty.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.generation.decoder import FIRST_CAPACITY, grown
from loom.generation.outputs import GenerateBeamDecoderOnlyOutput

_NEG = -1.0e9


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select along dim 1 of a (B, beams, ...) tensor with (B, k) indices."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(decoder, input_ids, inputs_embeds, cfg, processors, criteria, generator):
    K, max_length = cfg.num_beams, cfg.max_length
    rows, prompt_len = input_ids.shape
    B, device = rows // K, input_ids.device
    eos, pad = cfg._eos_tensor, cfg._pad_tensor
    keep = max(2, 1 + (eos.numel() if eos is not None else 0)) * K
    top_beams = torch.arange(keep, device=device) < K
    # the reference fills unused slots with pad (falling back to the first EOS when pad is 0 or unset)
    fill = (int(pad) if pad is not None and int(pad) != 0 else int(eos[0])) if eos is not None else -1
    length_penalty, early_stopping = cfg.length_penalty, cfg.early_stopping

    # token and beam-index buffers hold `capacity` positions and double when full (capped at max_length)
    capacity = min(max_length, prompt_len + FIRST_CAPACITY)
    running = grown(input_ids.view(B, K, prompt_len), capacity, capacity, fill)
    finished_seqs = running.clone()
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = _NEG  # all beams start identical: only the first may expand at step one
    finished_scores = torch.full((B, K), _NEG, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    running_idx = torch.full((B, K, capacity - prompt_len), -1, dtype=torch.int32, device=device)
    finished_idx = running_idx.clone()
    batch_offset = torch.arange(B, device=device).view(-1, 1) * K
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    want_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores_out, logits_out, attentions_out = [], [], []

    cur = prompt_len
    logits = decoder.prefill(input_ids if inputs_embeds is None else None, inputs_embeds)
    with decoder.stepping():  # torch on one thread while loom's kernels carry the matmuls
        while True:
            if cur == running.shape[-1]:
                running, finished_seqs = (grown(t, cur + 1, max_length, fill) for t in (running, finished_seqs))
                width = running.shape[-1] - prompt_len
                running_idx, finished_idx = (grown(t, width, width, -1) for t in (running_idx, finished_idx))
            logits = logits.float()
            flat_running = running.view(rows, -1)[:, :cur]
            log_probs = processors(flat_running, F.log_softmax(logits, dim=-1))
            if want_logits:
                logits_out.append(logits.clone())
            if want_scores:
                scores_out.append(log_probs.clone())
            if decoder.output_attentions:  # per step, for the (B * num_beams) rows the model ran, as the reference
                attentions_out.append(decoder.last_attentions)
            vocab = log_probs.shape[-1]
            log_probs = (log_probs.view(B, K, vocab) + running_scores[:, :, None]).view(B, K * vocab)

            # a. the best `keep` continuations over all beams
            if cfg.do_sample:
                top_idx = torch.multinomial(log_probs.softmax(-1), keep, generator=generator)
                top_lp, order = log_probs.gather(1, top_idx).sort(dim=-1, descending=True)
                top_idx = top_idx.gather(-1, order)
            else:
                top_lp, top_idx = torch.topk(log_probs, k=keep)
            src_beam = top_idx // vocab
            top_seqs = _gather(running, src_beam)
            top_seqs[:, :, cur] = top_idx % vocab
            top_beam_idx = _gather(running_idx, src_beam)
            top_beam_idx[:, :, cur - prompt_len] = (src_beam + batch_offset).to(top_beam_idx.dtype)

            # b. which of them are done
            hits = criteria(top_seqs.view(B * keep, -1)[:, :cur + 1],
                            tuple(scores_out) if want_scores else None).view(B, keep)

            # c. the best unfinished ones keep running
            run_lp = top_lp + hits.to(torch.float32) * _NEG
            chosen = torch.topk(run_lp, k=K)[1]
            running, running_scores = _gather(top_seqs, chosen), _gather(run_lp, chosen)
            running_idx = _gather(top_beam_idx, chosen)

            # d. finished candidates among the top K compete with the finished set
            just_done = hits & top_beams[None, :]
            done_lp = top_lp / ((cur + 1 - prompt_len) ** length_penalty)
            batch_full = is_finished.all(-1, keepdim=True) & (early_stopping is True)
            done_lp = done_lp + batch_full.to(torch.float32) * _NEG
            done_lp = done_lp + (~improvable).to(torch.float32) * _NEG
            done_lp = done_lp + (~just_done) * _NEG
            merged_scores = torch.cat((finished_scores, done_lp), 1)
            best = torch.topk(merged_scores, k=K)[1]
            finished_seqs = _gather(torch.cat((finished_seqs, top_seqs), 1), best)
            finished_scores = _gather(merged_scores, best)
            finished_idx = _gather(torch.cat((finished_idx, top_beam_idx), 1), best)
            is_finished = _gather(torch.cat((is_finished, just_done), 1), best)

            decoder.reorder(running_idx[..., cur - prompt_len].reshape(-1))
            cur += 1
            improvable = _still_improvable(improvable, running_scores, finished_scores, is_finished, cur, max_length,
                                           prompt_len, early_stopping, length_penalty)
            open_beams = not (bool(is_finished.all()) and early_stopping is True)
            if not (bool(improvable.any()) and open_beams and not bool(hits.all())):
                break
            logits = decoder.step(running.view(rows, -1)[:, :cur])

    n = cfg.num_return_sequences
    sequences = finished_seqs[:, :n].reshape(B * n, -1)
    seq_scores = finished_scores[:, :n].reshape(-1)
    beam_indices = finished_idx[:, :n].reshape(B * n, -1)
    generated = int((beam_indices + 1).bool().sum(1).max())
    sequences, beam_indices = sequences[:, :prompt_len + generated], beam_indices[:, :generated]
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences, sequences_scores=seq_scores if cfg.output_scores else None,
        scores=tuple(scores_out) if want_scores else None, logits=tuple(logits_out) if want_logits else None,
        beam_indices=beam_indices, attentions=tuple(attentions_out) if attentions_out else None, cache=decoder.cache)


def _still_improvable(improvable, running_scores, finished_scores, is_finished, cur, max_length, prompt_len,
                      early_stopping, length_penalty):
    """Can a running beam still beat the worst finished one? (the reference's heuristic, per early_stopping mode)"""
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_length - prompt_len
    else:
        best_length = cur - prompt_len
    best_running = running_scores[:, :1] / (best_length ** length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], _NEG)
    return improvable & (best_running > worst_finished).any(-1, keepdim=True)
