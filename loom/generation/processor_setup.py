"""The logits processors a GenerationConfig asks for, built in the reference's order (which matters: a penalty
applied before or after temperature gives different distributions)."""
from __future__ import annotations

import torch

from loom.generation import constraints as C
from loom.generation import logits_process as P
from loom.generation import warpers as W
from loom.generation import watermarking

# loom's processors whose __call__ runs only loom's and torch's code (the prefix-constrained one calls the user's
# function, classifier-free guidance runs the model): with only these, the generate loop runs no one else's code
# between decode steps (loom.generation.decode_plan)
LOOM_PROCESSORS = frozenset((
    P.MinLengthLogitsProcessor, P.MinNewTokensLengthLogitsProcessor, P.RepetitionPenaltyLogitsProcessor,
    P.NoRepeatNGramLogitsProcessor, P.NoBadWordsLogitsProcessor, P.ForcedBOSTokenLogitsProcessor,
    P.ForcedEOSTokenLogitsProcessor, P.SuppressTokensLogitsProcessor, P.TemperatureLogitsWarper, P.TopKLogitsWarper,
    P.TopPLogitsWarper, P.MinPLogitsWarper, P.TypicalLogitsWarper, W.EpsilonLogitsWarper, W.EtaLogitsWarper,
    W.TopHLogitsWarper, C.SequenceBiasLogitsProcessor, C.EncoderRepetitionPenaltyLogitsProcessor,
    C.EncoderNoRepeatNGramLogitsProcessor, C.ExponentialDecayLengthPenalty, C.InfNanRemoveLogitsProcessor,
    C.LogitNormalization, C.SuppressTokensAtBeginLogitsProcessor, watermarking.WatermarkLogitsProcessor,
    watermarking.SynthIDTextWatermarkLogitsProcessor))


def _penalties(cfg, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list:
    out = []
    if cfg.sequence_bias is not None:
        out.append(C.SequenceBiasLogitsProcessor(cfg.sequence_bias))
    if cfg.encoder_repetition_penalty is not None and cfg.encoder_repetition_penalty != 1.0:
        out.append(C.EncoderRepetitionPenaltyLogitsProcessor(float(cfg.encoder_repetition_penalty), input_ids))
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        skip = (attention_mask != 0).int().argmax(1) if attention_mask is not None else None
        out.append(P.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty, skip))
    if cfg.no_repeat_ngram_size:
        out.append(P.NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.encoder_no_repeat_ngram_size:
        out.append(C.EncoderNoRepeatNGramLogitsProcessor(cfg.encoder_no_repeat_ngram_size, input_ids))
    return out


def _length_rules(cfg, prompt_length: int) -> list:
    eos, out = cfg._eos_tensor, []
    if cfg.bad_words_ids is not None:
        out.append(P.NoBadWordsLogitsProcessor(cfg.bad_words_ids, eos))
    if eos is not None and cfg.min_length and cfg.min_length > 0:
        out.append(P.MinLengthLogitsProcessor(cfg.min_length, eos))
    if eos is not None and cfg.min_new_tokens and cfg.min_new_tokens > 0:
        out.append(P.MinNewTokensLengthLogitsProcessor(prompt_length, cfg.min_new_tokens, eos))
    if cfg.forced_bos_token_id is not None:
        out.append(P.ForcedBOSTokenLogitsProcessor(cfg.forced_bos_token_id))
    if cfg.forced_eos_token_id is not None:
        out.append(P.ForcedEOSTokenLogitsProcessor(cfg.max_length, cfg.forced_eos_token_id))
    if cfg.remove_invalid_values is True:
        out.append(C.InfNanRemoveLogitsProcessor())
    if cfg.exponential_decay_length_penalty is not None and eos is not None:
        out.append(C.ExponentialDecayLengthPenalty(cfg.exponential_decay_length_penalty, eos, prompt_length))
    if cfg.suppress_tokens is not None:
        out.append(P.SuppressTokensLogitsProcessor(cfg.suppress_tokens))
    if cfg.begin_suppress_tokens is not None:
        out.append(C.SuppressTokensAtBeginLogitsProcessor(cfg.begin_suppress_tokens, prompt_length))
    return out


def _warpers(cfg) -> list:
    eos, out = cfg._eos_tensor, []
    # beam sampling must keep a non-EOS continuation for every beam
    keep = (len(eos) + 1 if eos is not None else 2) if cfg.num_beams > 1 else 1
    if cfg.temperature is not None and cfg.temperature != 1.0:
        out.append(P.TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_h is not None:
        out.append(W.TopHLogitsWarper(cfg.top_h))
    if cfg.top_k:
        out.append(P.TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=keep))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        out.append(P.TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=keep))
    if cfg.min_p is not None:
        out.append(P.MinPLogitsWarper(cfg.min_p, min_tokens_to_keep=keep))
    if cfg.typical_p is not None and cfg.typical_p < 1.0:
        out.append(P.TypicalLogitsWarper(cfg.typical_p, min_tokens_to_keep=keep))
    if cfg.epsilon_cutoff is not None and 0.0 < cfg.epsilon_cutoff < 1.0:
        out.append(W.EpsilonLogitsWarper(cfg.epsilon_cutoff, min_tokens_to_keep=keep))
    if cfg.eta_cutoff is not None and 0.0 < cfg.eta_cutoff < 1.0:
        out.append(W.EtaLogitsWarper(cfg.eta_cutoff, min_tokens_to_keep=keep))
    return out


def build_logits_processors(cfg, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            custom: P.LogitsProcessorList | None = None,
                            vocab_size: int | None = None) -> P.LogitsProcessorList:
    """The processors a generation config asks for, in the reference's order; `custom` ones replace built-ins of the
    same type and the rest are appended before the sampling warpers. A watermark (which needs the model's
    `vocab_size`) comes after every other processor but the final renormalisation."""
    out = P.LogitsProcessorList(_penalties(cfg, input_ids, attention_mask) + _length_rules(cfg, input_ids.shape[1]))
    if custom:
        merged = P.LogitsProcessorList(next((c for c in custom if type(c) is type(p)), p) for p in out)
        merged.extend(c for c in custom if c not in merged)
        out = merged
    if cfg.do_sample:
        out.extend(_warpers(cfg))
    if cfg.watermarking_config is not None:
        if vocab_size is None:
            raise ValueError("watermarking_config needs the model's vocab_size to build its processor")
        out.append(cfg.watermarking_config.construct_processor(vocab_size, input_ids.device))
    if cfg.renormalize_logits is True:
        out.append(C.LogitNormalization())
    return out
