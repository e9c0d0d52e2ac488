"""`generate`: settings -> inputs -> lengths -> processors and criteria -> greedy/sampling loop or beam search.

Length rule: when `max_new_tokens` is given it wins: the output holds at most prompt + max_new_tokens tokens, and a
`max_length` given alongside it is ignored (the reference's precedence). `max_length` alone counts the prompt too.
With neither, 20 new tokens are generated (capped at the model's max_position_embeddings), as in the reference.
"""
from __future__ import annotations

import inspect

import torch

from loom.generation.beam_search import beam_search
from loom.generation.config import GenerationConfig
from loom.generation.decoder import FIRST_CAPACITY, Decoder, grown
from loom.generation.logits_process import LogitsProcessorList
from loom.generation.processor_setup import LOOM_PROCESSORS, build_logits_processors
from loom.generation.streamers import runs_only_loom
# both output classes stay importable from here, where the reference defines them
from loom.generation.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput  # noqa: F401
from loom.generation.stopping_criteria import MaxLengthCriteria, EosTokenCriteria, StoppingCriteriaList, \
    build_stopping_criteria
from loom.kernels import ops, policy

_MODEL_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "token_type_ids", "past_key_values", "cache")


def generate(model, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
             logits_processor: LogitsProcessorList | None = None,
             stopping_criteria: StoppingCriteriaList | None = None, streamer=None, tokenizer=None,
             generator: torch.Generator | None = None, **kwargs):
    """Generate tokens after `inputs` (B, T) token ids; returns (B * num_return_sequences, T') ids, or a
    `GenerateDecoderOnlyOutput` with `return_dict_in_generate=True`.

    Settings come from kwargs, then `generation_config`, then `model.generation_config`, then the global defaults.
    Other kwargs are model inputs: `attention_mask` (left padding), `input_ids`, `inputs_embeds`, and
    `past_key_values` (or `cache`, the reference's newer name): a cache to fill (e.g.
    `StaticCache(config=model.config, max_cache_len=...)`), or one that holds the prompt's first positions already
    (those are not run again).
    `generator` makes sampling reproducible without touching the global RNG.
    """
    with torch.inference_mode():
        return _generate(model, inputs, generation_config, logits_processor, stopping_criteria, streamer, tokenizer,
                         generator, kwargs)


def _generate(model, inputs, generation_config, logits_processor, stopping_criteria, streamer, tokenizer, generator,
              kwargs):
    model_default = model.generation_config or GenerationConfig.from_model_config(model.config)
    explicit_max_length = kwargs.get("max_length") is not None or (
        generation_config is not None and generation_config.max_length is not None
    ) or model_default.max_length is not None
    cfg, model_kwargs = (generation_config or GenerationConfig()).merged(model_default, **kwargs)
    unknown = sorted(set(model_kwargs) - set(_MODEL_INPUTS))
    if unknown:
        raise TypeError(f"generate() got unexpected arguments {unknown}: they are neither generation settings nor "
                        f"model inputs ({', '.join(_MODEL_INPUTS)})")
    if cfg.cache_implementation == "hybrid":  # Gemma 2/3 hub files name the old sliding cache; the reference now
        cfg.cache_implementation = None  # runs its default (dynamic) cache for it, whoever set it
    cfg.validate()
    if cfg.num_beams > 1 and streamer is not None:
        raise ValueError("streamer cannot be used with beam search (num_beams > 1); use num_beams=1")

    input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
    inputs_embeds = model_kwargs.get("inputs_embeds")
    attention_mask = model_kwargs.get("attention_mask")
    device = model.device
    _special_tokens(cfg, device)
    input_ids = _check_input_ids(cfg, input_ids, inputs_embeds, device)
    if inputs_embeds is not None:
        cfg.use_cache = True  # the embeddings are only consumed by the prefill
        inputs_embeds = inputs_embeds.to(device)
    prompt_positions = inputs_embeds.shape[1] if inputs_embeds is not None else input_ids.shape[1]
    _check_positions(model.config, prompt_positions)
    batch = input_ids.shape[0] if inputs_embeds is None else inputs_embeds.shape[0]

    if attention_mask is None:
        attention_mask = _infer_attention_mask(cfg, input_ids)
    elif attention_mask.dim() != 2 or attention_mask.shape != (batch, prompt_positions):
        raise ValueError(f"attention_mask must have shape {(batch, prompt_positions)} (batch, prompt length), got "
                         f"{tuple(attention_mask.shape)}")
    position_ids = None
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: let the attention take its mask-free path
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    token_type_ids = model_kwargs.get("token_type_ids")
    if token_type_ids is not None and "token_type_ids" not in inspect.signature(model.forward).parameters:
        raise TypeError(f"generate() got token_type_ids, which {type(model).__name__} does not take")
    if token_type_ids is not None and token_type_ids.shape != (batch, prompt_positions):
        raise ValueError(f"token_type_ids must have shape {(batch, prompt_positions)} (batch, prompt length), got "
                         f"{tuple(token_type_ids.shape)}")
    expand = max(cfg.num_beams, cfg.num_return_sequences)
    if expand > 1:
        input_ids, attention_mask, position_ids, inputs_embeds, token_type_ids = (
            None if t is None else t.repeat_interleave(expand, dim=0)
            for t in (input_ids, attention_mask, position_ids, inputs_embeds, token_type_ids))
    if streamer is not None:
        streamer.put(input_ids.cpu())

    prompt_len = input_ids.shape[1]
    _resolve_lengths(cfg, model.config, prompt_len, prompt_positions, explicit_max_length, inputs_embeds is not None)
    new_tokens = cfg.max_length - prompt_len
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    processors = build_logits_processors(cfg, input_ids, attention_mask, logits_processor,
                                         vocab_size=getattr(text_config, "vocab_size", None))
    criteria = build_stopping_criteria(cfg, tokenizer, stopping_criteria)
    if new_tokens <= 0:
        return _finish(cfg, input_ids, None, None, None, streamer)

    past_key_values = _check_past(cfg, _passed_cache(model_kwargs), prompt_positions)
    decoder = Decoder(model, rows=input_ids.shape[0], prompt_positions=prompt_positions,
                      total_positions=prompt_positions + new_tokens, attention_mask=attention_mask,
                      position_ids=position_ids, token_type_ids=token_type_ids, use_cache=cfg.use_cache,
                      cache_implementation=cfg.cache_implementation, output_hidden_states=cfg.output_hidden_states,
                      output_attentions=cfg.return_dict_in_generate and cfg.output_attentions,
                      compile=bool(cfg.compile), cache=past_key_values)
    if cfg.num_beams > 1:
        return beam_search(decoder, input_ids, inputs_embeds, cfg, processors, criteria, generator)
    return _sample(decoder, input_ids, inputs_embeds, cfg, processors, criteria, streamer, generator)


def _sample(decoder: Decoder, input_ids, inputs_embeds, cfg, processors, criteria, streamer, generator):
    """Greedy decoding or multinomial sampling, one token per step into a (rows, capacity) buffer that doubles when
    full (capped at max_length): no copy per step, and no reservation for tokens an early EOS never makes."""
    rows, cur = input_ids.shape
    seqs = grown(input_ids, min(cfg.max_length, cur + FIRST_CAPACITY), cfg.max_length)
    eos, pad = cfg._eos_tensor, cfg._pad_tensor
    # The common case (only max-length and EOS criteria) is checked inline: one host sync per step, for EOS.
    simple = all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in criteria)
    single_eos = int(eos[0]) if eos is not None and eos.numel() == 1 else None
    # A single row under those criteria is unfinished until the loop ends: no finished rows to pad, and its EOS
    # check is one read of the token (a few torch ops fewer per step).
    one_row = simple and rows == 1
    # nothing but loom's code runs between steps: the decode plan may skip its full re-check (decode_plan.py)
    decoder.quiet = ((streamer is None or runs_only_loom(streamer)) and simple
                     and all(type(p) in LOOM_PROCESSORS for p in processors))
    eos_ids = set() if eos is None else set(eos.tolist())
    unfinished = torch.ones(rows, dtype=torch.bool, device=seqs.device)
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    want_logits = cfg.return_dict_in_generate and cfg.output_logits
    want_hidden = cfg.return_dict_in_generate and cfg.output_hidden_states
    scores_out, logits_out, hidden_out, attentions_out = [], [], [], []

    # greedy decoding of one row with nothing asked of each step but its token: runs of steps in one C call each
    # (Decoder.run_greedy), where the decode plan takes the model
    # (`quiet` admits no streamer but loom's TextStreamer, which is fed each run's tokens after it)
    greedy_runs = (one_row and not cfg.do_sample and not processors and decoder.quiet
                   and not (want_scores or want_logits or want_hidden or decoder.output_attentions))
    eos_run = torch.tensor(sorted(eos_ids), dtype=torch.int64)
    logits = decoder.prefill(input_ids if inputs_embeds is None else None, inputs_embeds)
    with decoder.stepping():  # torch on one thread while loom's kernels carry the matmuls
        while True:
            logits = logits.float()
            scores = processors(seqs[:, :cur], logits) if processors else logits
            if want_scores:
                scores_out.append(scores)
            if want_logits:
                logits_out.append(logits)
            if want_hidden:
                hidden_out.append(decoder.last_hidden_states)
            if decoder.output_attentions:
                attentions_out.append(decoder.last_attentions)
            if cfg.do_sample:
                next_tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            elif policy.argmax_applies(scores):
                next_tokens = ops.argmax_rows(scores)  # torch.argmax's pick, ~4x faster over a 50k vocabulary
            else:
                next_tokens = scores.argmax(-1)
            if eos is not None and not one_row:
                next_tokens = torch.where(unfinished, next_tokens, pad)  # finished rows are padded
            if cur == seqs.shape[1]:
                seqs = grown(seqs, cur + 1, cfg.max_length)
            seqs[:, cur] = next_tokens
            cur += 1
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if one_row:
                if cur >= cfg.max_length or (eos_ids and int(next_tokens) in eos_ids):
                    break
            elif simple:
                if eos is not None:
                    hit = next_tokens == single_eos if single_eos is not None else torch.isin(next_tokens, eos)
                    unfinished &= ~hit
                    if not bool(unfinished.any()):
                        break
                if cur >= cfg.max_length:
                    break
            else:
                unfinished &= ~criteria(seqs[:, :cur], tuple(scores_out) if want_scores else None)
                if not bool(unfinished.any()):
                    break
            if greedy_runs and decoder.plan is not None:  # the first step built the plan and ran its full check
                if decoder.plan and seqs.shape[1] < cfg.max_length:
                    seqs = grown(seqs, cfg.max_length, cfg.max_length)
                got = decoder.run_greedy(seqs, cur, eos_run)
                greedy_runs = got > 0  # what refused a run now would refuse the next
                if got:
                    if streamer is not None:  # token by token, as the steps feed it (a run lasts ~0.1 s)
                        for token in seqs[:, cur:cur + got].unbind(1):
                            streamer.put(token)
                    cur += got
                    if cur >= cfg.max_length or int(seqs[0, cur - 1]) in eos_ids:
                        break
            logits = decoder.step(seqs[:, :cur])
    return _finish(cfg, seqs[:, :cur], scores_out, logits_out, decoder.cache, streamer, hidden_out, attentions_out)


def _finish(cfg, sequences, scores, logits, cache, streamer, hidden=None, attentions=None):
    if streamer is not None:
        streamer.end()
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(
        sequences=sequences, scores=tuple(scores) if cfg.output_scores and scores is not None else None,
        logits=tuple(logits) if cfg.output_logits and logits is not None else None,
        hidden_states=tuple(hidden) if cfg.output_hidden_states and hidden else None,
        attentions=tuple(attentions) if cfg.output_attentions and attentions else None, cache=cache)


# -- preparation ---------------------------------------------------------------------------------------------------
def _special_tokens(cfg, device) -> None:
    """EOS ids as a 1-D tensor; pad defaults to the first EOS id (the reference's rule)."""
    eos = None if cfg.eos_token_id is None else torch.as_tensor(cfg.eos_token_id, device=device).view(-1)
    if eos is not None and eos.numel() == 0:
        eos = None
    pad = cfg.pad_token_id
    if pad is None and eos is not None:
        pad = eos[0]
    cfg._eos_tensor = eos
    cfg._pad_tensor = None if pad is None else torch.as_tensor(pad, device=device)


def _check_input_ids(cfg, input_ids, inputs_embeds, device) -> torch.Tensor:
    if input_ids is None:
        if inputs_embeds is not None:
            return torch.empty(inputs_embeds.shape[0], 0, dtype=torch.long, device=device)
        if cfg.bos_token_id is None:
            raise ValueError("generate() needs input_ids (or inputs_embeds); with neither, bos_token_id must be set "
                             "in the generation config to start from it")
        return torch.full((1, 1), cfg.bos_token_id, dtype=torch.long, device=device)
    if not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must be an integer tensor of shape (batch, length), got {type(input_ids)}"
                        f"{'' if not torch.is_tensor(input_ids) else ' of ' + str(input_ids.dtype)}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0 and inputs_embeds is None:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one prompt token, "
                         "e.g. the BOS token")
    return input_ids.to(device=device, dtype=torch.long)


def _check_positions(config, prompt_positions: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and prompt_positions > limit:
        raise ValueError(f"the prompt has {prompt_positions} tokens but the model handles at most "
                         f"max_position_embeddings={limit}; truncate input_ids")


def _passed_cache(model_kwargs: dict):
    """The cache given as `past_key_values=` or as `cache=` (the reference's newer name for it)."""
    past, cache = model_kwargs.get("past_key_values"), model_kwargs.get("cache")
    if past is not None and cache is not None:
        raise ValueError("generate() got both past_key_values and cache, two names for the same cache; pass one")
    return cache if past is None else past


def _check_past(cfg, cache, prompt_positions: int):
    """A cache passed to generate: used as it is (its first positions are the prompt's, already run)."""
    if cache is None:
        return None
    if not hasattr(cache, "update") or not hasattr(cache, "get_seq_length"):
        raise TypeError(f"generate(past_key_values=...) takes a cache (DynamicCache, StaticCache, ...), got "
                        f"{type(cache).__name__}")
    if cfg.cache_implementation is not None:
        raise ValueError(f"generate() got both past_key_values and cache_implementation="
                         f"{cfg.cache_implementation!r}; pass one of them (the cache you pass is the one used)")
    if not cfg.use_cache:
        raise ValueError("generate() got past_key_values with use_cache=False; drop one of them")
    cached = cache.get_seq_length()
    if cached >= prompt_positions:
        raise ValueError(f"past_key_values holds {cached} positions but the prompt has {prompt_positions}: the cache "
                         "must hold fewer positions than the prompt (at least its last token is run again); pass "
                         "a fresh cache or crop it")
    return cache


def _infer_attention_mask(cfg, input_ids) -> torch.Tensor | None:
    """Mask from pad tokens, only when pad is set and differs from EOS (as the reference infers it)."""
    pad, eos = cfg._pad_tensor, cfg._eos_tensor
    if pad is None or input_ids.numel() == 0:
        return None
    if eos is not None and bool(torch.isin(eos, pad).any()):
        return None
    is_pad = input_ids == pad
    return (~is_pad).long() if bool(is_pad.any()) else None


def _resolve_lengths(cfg, model_config, prompt_len: int, prompt_positions: int, explicit_max_length: bool,
                     from_embeds: bool) -> None:
    """Turn max_new_tokens / max_length / min_new_tokens into absolute lengths of the output sequence."""
    if cfg.max_new_tokens is not None:
        cfg.max_length = prompt_len + cfg.max_new_tokens
    elif not explicit_max_length:
        cfg.max_length = cfg.max_length + prompt_len
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit is not None:
            cfg.max_length = min(cfg.max_length, limit)
    elif from_embeds:
        cfg.max_length -= prompt_positions  # max_length counted the embedded prompt; the output does not hold it
    if cfg.max_new_tokens is None and cfg.max_length <= prompt_len:
        raise ValueError(f"the prompt has {prompt_len} tokens but max_length={cfg.max_length} leaves no room for new "
                         "tokens; set max_new_tokens instead")
    if cfg.min_new_tokens is not None:
        cfg.min_length = prompt_len + cfg.min_new_tokens
