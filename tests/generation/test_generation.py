"""generate() behaviour: batching, caches, streamers, stop strings, reproducibility, lengths and bad input."""
from __future__ import annotations

import threading

import pytest
import torch

import loom
from gen_helpers import ByteTokenizer, model_pair, prompts


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return model_pair(tmp_path_factory, "llama", pad_token_id=0)[0]


@pytest.fixture(scope="session")
def models(tmp_path_factory, llama):
    gpt2 = model_pair(tmp_path_factory, "gpt2", pad_token_id=0)[0]
    mistral = model_pair(tmp_path_factory, "mistral", pad_token_id=0)[0]  # sliding_window=4
    return {"llama": llama, "gpt2": gpt2, "mistral": mistral}


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])
def test_batched_equals_one_by_one(models, name):
    model = models[name]
    lengths = [1, 3, 5, 7, 2, 9, 4, 11, 6, 8, 10, 12]
    ids, mask = prompts(lengths, seed=11)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    T = ids.shape[1]
    for i, n in enumerate(lengths):
        alone = model.generate(ids[i:i + 1, T - n:], max_new_tokens=8, eos_token_id=None)
        assert torch.equal(batched[i, T:], alone[0, n:]), f"row {i} (prompt length {n})"


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])
def test_cached_scores_equal_uncached(models, name):
    ids, mask = prompts([4, 7], seed=12)
    kw = dict(attention_mask=mask, max_new_tokens=8, return_dict_in_generate=True, output_logits=True)
    cached = models[name].generate(ids, **kw)
    uncached = models[name].generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("beams", [1, 3])
def test_static_cache_equals_dynamic(models, name, beams):
    ids, mask = prompts([4, 7], seed=13)
    kw = dict(attention_mask=mask, max_new_tokens=9, num_beams=beams, return_dict_in_generate=True, output_logits=True)
    dynamic = models[name].generate(ids, **kw)
    static = models[name].generate(ids, cache_implementation="static", **kw)
    assert isinstance(static.cache, loom.StaticCache) and isinstance(dynamic.cache, loom.DynamicCache)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_matches_reference(tmp_path_factory):
    ours, ref = model_pair(tmp_path_factory, "llama", pad_token_id=0)
    ids, mask = prompts([5, 3], seed=14)
    embeds = ref.get_input_embeddings()(ids).detach()
    a = ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6)
    with torch.no_grad():
        b = ref.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(a, b) and a.shape == (2, 6)


# -- streamers and stop strings -----------------------------------------------------------------------------------
def test_text_streamer_prints_the_final_text(llama, capsys):
    tok = ByteTokenizer()
    ids = torch.tensor([[1, 20, 21, 22]])
    out = llama.generate(ids, max_new_tokens=30, eos_token_id=None, streamer=loom.TextStreamer(tok, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed == tok.decode(out[0, 4:]) + "\n"


def test_iterator_streamer_never_splits_characters(llama):
    tok = ByteTokenizer()
    # bias generation towards the pieces of multi-byte characters so that they really occur
    bias = torch.zeros(99)
    bias[5:15] = 3.0

    class Bias(loom.generation.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores + bias

    streamer = loom.TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=llama.generate(
        torch.tensor([[1, 30]]), max_new_tokens=40, eos_token_id=None, do_sample=True, streamer=streamer,
        generator=torch.Generator().manual_seed(0), logits_processor=loom.LogitsProcessorList([Bias()]))))
    thread.start()
    pieces = list(streamer)
    thread.join()
    final = tok.decode(result["out"][0, 2:])
    assert "".join(pieces) == final
    multibyte = [p for p in pieces if any(ord(c) > 127 and c != "\ufffd" for c in p)]
    assert multibyte, "the test should produce multi-byte characters"
    # a piece never ends in the middle of a character whose remaining bytes came later
    joined = ""
    for p in pieces[:-1]:
        joined += p
        assert final.startswith(joined)


def test_stop_strings_stop_at_the_completing_token(llama):
    tok = ByteTokenizer()
    ids = torch.tensor([[1, 40, 41]])
    full = llama.generate(ids, max_new_tokens=25, eos_token_id=None)
    text_tokens = full[0, 3:].tolist()
    k = 10  # a stop string spanning the end of token k-1 and the start of token k
    left, right = tok.decode(text_tokens[k - 1:k]), tok.decode(text_tokens[k:k + 1])
    stop = left[-1:] + right[:1]
    out = llama.generate(ids, max_new_tokens=25, eos_token_id=None, stop_strings=stop, tokenizer=tok)
    generated = tok.decode(out[0, 3:])
    assert stop in generated and stop not in tok.decode(out[0, 3:-1])
    assert torch.equal(out[0], full[0, :out.shape[1]])
    with pytest.raises(ValueError, match="tokenizer"):
        llama.generate(ids, max_new_tokens=5, stop_strings="x")


# -- reproducibility and lengths ------------------------------------------------------------------------------------
def test_sampling_is_reproducible(llama):
    ids = torch.tensor([[1, 5, 6]])
    kw = dict(do_sample=True, max_new_tokens=15, eos_token_id=None, top_k=0)
    a = llama.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    b = llama.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    c = llama.generate(ids, generator=torch.Generator().manual_seed(2), **kw)
    torch.manual_seed(3)
    d = llama.generate(ids, **kw)
    torch.manual_seed(3)
    e = llama.generate(ids, **kw)
    assert torch.equal(a, b) and torch.equal(d, e) and not torch.equal(a, c)


def test_length_rules(llama):
    ids = torch.tensor([[1, 5, 6, 7]])
    assert llama.generate(ids, max_new_tokens=3, eos_token_id=None).shape[1] == 7
    assert llama.generate(ids, max_length=6, eos_token_id=None).shape[1] == 6
    # both given: max_new_tokens wins
    assert llama.generate(ids, max_new_tokens=3, max_length=50, eos_token_id=None).shape[1] == 7
    assert llama.generate(ids, max_new_tokens=8, max_length=5, eos_token_id=None).shape[1] == 12
    assert torch.equal(llama.generate(ids, max_new_tokens=0), ids)
    # a generation config's setting is used unless the call overrides it
    cfg = loom.GenerationConfig(max_new_tokens=2, eos_token_id=None)
    assert llama.generate(ids, generation_config=cfg).shape[1] == 6
    assert llama.generate(ids, generation_config=cfg, max_new_tokens=1).shape[1] == 5


def test_eos_stops_and_pads_finished_rows(llama):
    ids, mask = prompts([4, 6], seed=15)
    free = llama.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 2])
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    row = out[0, ids.shape[1]:].tolist()
    first = row.index(eos)
    assert all(t == 0 for t in row[first + 1:])
    if eos not in free[1, ids.shape[1]:].tolist():
        assert out.shape[1] == free.shape[1] and torch.equal(out[1], free[1])


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids is empty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(input_ids=torch.ones(1, 65, dtype=torch.long)), "max_position_embeddings"),
    (dict(max_length=3, max_new_tokens=None), "max_length"),
    (dict(cache_implementation="paged"), "cache_implementation"),
    (dict(attention_mask=torch.ones(1, 9)), "attention_mask"),
])
def test_bad_input_names_the_argument(llama, kwargs, match):
    kwargs = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "max_new_tokens": 4, **kwargs}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        llama.generate(kwargs.pop("input_ids"), **kwargs)


def test_unknown_argument_and_headless_model(llama, tmp_path):
    with pytest.raises(TypeError, match="max_tokens"):
        llama.generate(torch.tensor([[1, 2]]), max_tokens=3)
    headless = loom.LlamaModel(llama.config)
    with pytest.raises(TypeError, match="language-modelling head"):
        headless.generate(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="streamer"):
        llama.generate(torch.tensor([[1, 2]]), num_beams=2, streamer=loom.TextStreamer(ByteTokenizer()))


# -- GenerationConfig ---------------------------------------------------------------------------------------------
def test_generation_config_round_trips_with_the_reference(tmp_path):
    import transformers

    ours = loom.GenerationConfig(max_new_tokens=7, do_sample=True, top_p=0.9, eos_token_id=[2, 3], custom_key=1)
    ours.save_pretrained(tmp_path / "a")
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "a")
    assert (theirs.max_new_tokens, theirs.do_sample, theirs.top_p, theirs.eos_token_id) == (7, True, 0.9, [2, 3])
    theirs.save_pretrained(tmp_path / "b")
    back = loom.GenerationConfig.from_pretrained(tmp_path / "b")
    assert (back.max_new_tokens, back.top_p, back.eos_token_id, back.top_k) == (7, 0.9, [2, 3], None)
    assert loom.GenerationConfig.from_pretrained(tmp_path / "a") == ours
