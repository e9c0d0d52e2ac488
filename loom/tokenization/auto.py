"""AutoTokenizer: `from_pretrained(path_or_id)` for any supported tokenizer files."""
from __future__ import annotations

import os

from .tokenizer import PreTrainedTokenizerFast


class AutoTokenizer:
    """Loads the tokenizer of a model directory or hub id; see `from_pretrained`."""

    def __init__(self):
        raise TypeError("AutoTokenizer is not instantiated; use AutoTokenizer.from_pretrained(path_or_id)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *inputs,
                        **kwargs) -> PreTrainedTokenizerFast:
        """Load tokenizer.json (or convert vocab.txt, vocab.json + merges.txt, or a SentencePiece model) with
        tokenizer_config.json, special_tokens_map.json, added_tokens.json and chat_template.jinja.

        With `gguf_file=` the tokenizer is built from that GGUF file's metadata instead (loom/tokenization/gguf.py).

        Hub options (revision, cache_dir, local_files_only, token, subfolder) pick the files; any other keyword
        overrides the matching tokenizer_config.json setting (e.g. padding_side="left", model_max_length=512).
        """
        return PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, *inputs, **kwargs)
