"""text-generation equals the reference pipeline for greedy decoding: prompts, batches, chats, output modes."""
from __future__ import annotations

import pytest

GREEDY = {"max_new_tokens": 5, "do_sample": False}


@pytest.mark.parametrize("inputs", ["hello world", ["hello world", "a much longer prompt here"],
                                    [{"role": "user", "content": "hi there"}]])
def test_generation_matches_reference(gpt2_dir, reference_pipeline, loom_pipeline, inputs):
    ours, ref = loom_pipeline("text-generation", gpt2_dir), reference_pipeline("text-generation", gpt2_dir)
    assert ours(inputs, batch_size=2, **GREEDY) == ref(inputs, **GREEDY)


@pytest.mark.parametrize("kwargs", [{"return_full_text": False}, {"return_tensors": True}])
def test_output_modes_match_reference(gpt2_dir, reference_pipeline, loom_pipeline, kwargs):
    ours, ref = loom_pipeline("text-generation", gpt2_dir), reference_pipeline("text-generation", gpt2_dir)
    assert ours("hello", **kwargs, **GREEDY) == ref("hello", **kwargs, **GREEDY)


def test_streamer_receives_the_new_text(gpt2_dir, loom_pipeline):
    from loom.generation import TextIteratorStreamer

    gen = loom_pipeline("text-generation", gpt2_dir)
    streamer = TextIteratorStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = gen("hello world", streamer=streamer, return_full_text=False, **GREEDY)
    assert "".join(streamer).strip() == result[0]["generated_text"].strip()


def test_too_long_prompt_is_shortened_not_a_crash(gpt2_dir, loom_pipeline):
    gen = loom_pipeline("text-generation", gpt2_dir)
    with pytest.warns(UserWarning, match="only its last"):
        out = gen("word " * 500, **GREEDY)
    assert out[0]["generated_text"].startswith("word word")
