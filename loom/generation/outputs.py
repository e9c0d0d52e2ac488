"""What `generate(..., return_dict_in_generate=True)` returns. Its own module because both decoding loops build
these (the sampling loop in utils.py and beam_search.py), and utils.py calls beam search."""
from __future__ import annotations

from loom.outputs import ModelOutput


class GenerateDecoderOnlyOutput(ModelOutput):
    """`sequences` (B, T); per-step `scores` / `logits` tuples of (B, V) when asked for; the `cache`."""

    @property
    def past_key_values(self):
        return self.get("cache")


class GenerateBeamDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """Adds `sequences_scores` (length-penalised log-probs) and `beam_indices`."""
