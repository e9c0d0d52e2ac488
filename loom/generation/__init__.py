"""Text generation: GenerationConfig, logits processors, stopping criteria, streamers and the decoding loops.

Only GenerationConfig is imported eagerly (it needs no torch); the other names load on first access.
"""
from __future__ import annotations

import importlib

from loom.generation.config import GenerationConfig

_LAZY = {
    "TextStreamer": "loom.generation.streamers",
    "TextIteratorStreamer": "loom.generation.streamers",
    "BaseStreamer": "loom.generation.streamers",
    "LogitsProcessor": "loom.generation.logits_process",
    "LogitsProcessorList": "loom.generation.logits_process",
    "StoppingCriteria": "loom.generation.stopping_criteria",
    "StoppingCriteriaList": "loom.generation.stopping_criteria",
    "generate": "loom.generation.utils",
    "GenerateDecoderOnlyOutput": "loom.generation.outputs",
    "GenerateBeamDecoderOnlyOutput": "loom.generation.outputs",
}

__all__ = ["GenerationConfig", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loom.generation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
