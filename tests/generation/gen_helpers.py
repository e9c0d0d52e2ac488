"""Shared pieces for the generation tests: tiny reference/loom model pairs and a byte-level toy tokenizer."""
from __future__ import annotations

import torch

import loom

CAUSAL = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}


def model_pair(tmp_path_factory, model_type: str, **overrides):
    """(loom model, reference model) with the same random weights, both in eval mode."""
    from loomtest import reference_checkpoint

    path, ref = reference_checkpoint(tmp_path_factory, model_type, CAUSAL[model_type], **overrides)
    return getattr(loom, CAUSAL[model_type]).from_pretrained(path), ref


def prompts(lengths, seed=0, vocab=99, pad=0):
    """Left-padded batch (ids, mask) of random prompts with the given lengths; ids avoid 0-2 (pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


class ByteTokenizer:
    """Toy tokenizer whose tokens are raw byte strings, some of them pieces of multi-byte UTF-8 characters, so that
    decoding a prefix can end in the middle of a character."""

    def __init__(self, vocab_size: int = 99) -> None:
        pieces = [b"<pad>", b"<s>", b"</s>", b"\n", b" ", b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac", b"\xe4\xb8",
                  b"\xad", "é".encode(), "€".encode(), "中".encode()]
        letters = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz"]
        words = [w.encode() for w in ("the", " cat", " sat", "on", " mat", "ing", " a", "st", "op", "!", ".", ",")]
        self.pieces = (pieces + letters + words)
        while len(self.pieces) < vocab_size:
            self.pieces.append(bytes([97 + len(self.pieces) % 26]) * 2)

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        special = {0, 1, 2} if skip_special_tokens else set()
        return b"".join(self.pieces[i] for i in ids if i not in special).decode("utf-8", errors="replace")
