"""`cache=` (the reference 5.x's name for `past_key_values`) on model forwards, and `out.cache` on outputs."""
import pytest
import torch

import loom
from loomtest import reference_checkpoint


@pytest.mark.parametrize("model_type, cls", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
                                             ("qwen3", "Qwen3ForCausalLM")])
def test_cache_keyword_continues_as_past_key_values(tmp_path_factory, model_type, cls):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls)
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 9, 3, 7, 2, 11]])
    with torch.no_grad():
        first = ours(ids[:, :-1], use_cache=True)
        assert first.cache is first.past_key_values is not None
        step = ours(ids[:, -1:], cache=first.cache, use_cache=True).logits
        ref_first = ref(ids[:, :-1], use_cache=True)
        ref_step = ref(ids[:, -1:], cache=ref_first.cache, use_cache=True).logits
        whole = ours(ids).logits[:, -1:]
    torch.testing.assert_close(step, ref_step, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)
    # without the rename the step would run with no cache: a one-token forward, different logits
    with torch.no_grad():
        alone = ours(ids[:, -1:]).logits
    assert not torch.allclose(step, alone, atol=1e-3)


def test_cache_and_past_key_values_together_raise(tmp_path_factory):
    path, _ = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 9, 3]])
    with torch.no_grad():
        cache = ours(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
            ours(ids[:, -1:], cache=cache, past_key_values=cache)


def test_signature_keeps_its_parameters():
    import inspect
    params = inspect.signature(loom.LlamaForCausalLM.forward).parameters
    assert "past_key_values" in params and "labels" in params  # the Trainer and peft read columns from it
