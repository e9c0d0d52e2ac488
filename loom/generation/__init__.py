"""Text generation: GenerationConfig, logits processors, caches, decoding loops and streamers."""
from loom.generation.config import GenerationConfig

__all__ = ["GenerationConfig"]
