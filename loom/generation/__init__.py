"""Text generation: GenerationConfig, logits processors, stopping criteria, streamers and the decoding loops.

Only GenerationConfig is imported eagerly (it needs no torch); the other names load on first access.
"""
from __future__ import annotations

import importlib

from loom.generation.config import GenerationConfig, GenerationMode

_LAZY = {
    **dict.fromkeys(("TextStreamer", "TextIteratorStreamer", "AsyncTextIteratorStreamer", "BaseStreamer"),
                    "loom.generation.streamers"),
    **dict.fromkeys(("LogitsProcessor", "LogitsProcessorList", "MinLengthLogitsProcessor",
                     "MinNewTokensLengthLogitsProcessor", "RepetitionPenaltyLogitsProcessor",
                     "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor", "ForcedBOSTokenLogitsProcessor",
                     "ForcedEOSTokenLogitsProcessor", "SuppressTokensLogitsProcessor", "TemperatureLogitsWarper",
                     "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper"),
                    "loom.generation.logits_process"),
    **dict.fromkeys(("EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper"), "loom.generation.warpers"),
    **dict.fromkeys(("SequenceBiasLogitsProcessor", "PrefixConstrainedLogitsProcessor",
                                    "EncoderRepetitionPenaltyLogitsProcessor", "EncoderNoRepeatNGramLogitsProcessor",
                                    "ExponentialDecayLengthPenalty", "InfNanRemoveLogitsProcessor",
                                    "LogitNormalization", "SuppressTokensAtBeginLogitsProcessor"),
                    "loom.generation.constraints"),
    **dict.fromkeys(("StoppingCriteria", "StoppingCriteriaList", "MaxLengthCriteria", "MaxTimeCriteria",
                     "EosTokenCriteria", "StopStringCriteria", "ConfidenceCriteria", "validate_stopping_criteria"),
                    "loom.generation.stopping_criteria"),
    **dict.fromkeys(("ClassifierFreeGuidanceLogitsProcessor", "UnbatchedClassifierFreeGuidanceLogitsProcessor"),
                    "loom.generation.guidance"),
    **dict.fromkeys(("WatermarkingConfig", "SynthIDTextWatermarkingConfig", "WatermarkLogitsProcessor",
                     "SynthIDTextWatermarkLogitsProcessor", "SynthIDTextWatermarkState"),
                    "loom.generation.watermarking"),
    "generate": "loom.generation.utils",
    "GenerateDecoderOnlyOutput": "loom.generation.outputs",
    "GenerateBeamDecoderOnlyOutput": "loom.generation.outputs",
}

__all__ = ["GenerationConfig", "GenerationMode", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loom.generation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
