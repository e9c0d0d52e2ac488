"""Classifier-free guidance processors: the batched one against the reference's on the same scores, the unbatched
one against the formula on a tiny model's own unconditional logits, with and without the branch's cache."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import loom
from loom.generation.guidance import (ClassifierFreeGuidanceLogitsProcessor,
                                      UnbatchedClassifierFreeGuidanceLogitsProcessor)


def test_batched_guidance_matches_reference():
    scores = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(2, 3, dtype=torch.long)
    want = transformers.ClassifierFreeGuidanceLogitsProcessor(2.5)(ids, scores)
    torch.testing.assert_close(ClassifierFreeGuidanceLogitsProcessor(2.5)(ids, scores), want)


def test_batched_guidance_errors_name_the_problem():
    with pytest.raises(ValueError, match="guidance_scale must be > 1.*got 1"):
        ClassifierFreeGuidanceLogitsProcessor(1)
    with pytest.raises(ValueError, match="twice the batch.*got 3 score rows for 2 input rows"):
        ClassifierFreeGuidanceLogitsProcessor(2.0)(torch.zeros(2, 1, dtype=torch.long), torch.zeros(3, 5))


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = loom.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    return loom.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_unbatched_guidance_runs_the_unconditional_branch(tiny_llama, use_cache):
    uncond_prompt = torch.tensor([[5, 7]])
    cfg = UnbatchedClassifierFreeGuidanceLogitsProcessor(1.5, tiny_llama, uncond_prompt, use_cache=use_cache)
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        for step, new_token in enumerate([9, 4, 11]):
            scores = torch.randn(1, 40, generator=torch.Generator().manual_seed(step))
            got = cfg(tokens, scores)
            branch = torch.cat([uncond_prompt, tokens[:, 3:]], dim=1)  # the prompt, then the generated tokens
            uncond = F.log_softmax(tiny_llama(branch).logits[:, -1], -1)
            want = uncond + 1.5 * (F.log_softmax(scores, -1) - uncond)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tokens = torch.cat([tokens, torch.tensor([[new_token]])], dim=1)


def test_unbatched_guidance_scale_one_is_log_softmax(tiny_llama):
    scores = torch.randn(2, 40)
    got = UnbatchedClassifierFreeGuidanceLogitsProcessor(1, tiny_llama)(torch.zeros(2, 1, dtype=torch.long), scores)
    torch.testing.assert_close(got, F.log_softmax(scores, -1))
