"""Models reading a static cache whose sliding-window layers keep only their window, as the reference builds it:
`StaticCache(config=..., max_cache_len=...)` (a `LayeredStaticCache` of `StaticSlidingWindowLayer`s and
`StaticLayer`s), in a forward loop, passed to `generate` (greedy, left-padded, beam search, with its first positions
already filled) and next to `cache_implementation="static"`, against the reference on sharp tiny checkpoints whose
prompts run past the 4-token window."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.models import cache_layers
from loom.models.cache import LayeredStaticCache
from loomtest import TINY

# family -> (class name, config overrides); every one has sliding layers of window 4
FAMILIES = {
    "mistral": ("MistralForCausalLM", {}),
    "gemma2": ("Gemma2ForCausalLM", {}),
    "gemma3_text": ("Gemma3ForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                       layer_types=["full_attention", "sliding_attention"])),
}
PROMPT, NEW = 9, 10  # both longer than the window


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(loom model, reference model) of one family, every weight offset by N(0, 0.3) so that each key matters."""
    import transformers

    model_type = request.param
    name, overrides = FAMILIES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY[model_type], "pad_token_id": 0, **overrides})
    torch.manual_seed(0)
    ref = getattr(transformers, name)(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp(model_type)
    ref.save_pretrained(path)
    return getattr(loom, name).from_pretrained(path), ref


def _ids(B=2, T=PROMPT, seed=2):
    ids = torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded
    return ids, mask


def _stepwise(model, cache, ids, mask, prefill: int):
    """Logits of a prefill of `prefill` tokens and then one token per forward, all into `cache`."""
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("prefill", [3, 6])  # inside the window, past it
def test_forward_over_a_window_only_static_cache_matches_the_reference(pair, prefill):
    import transformers

    ours, ref = pair
    ids, mask = _ids(T=14)
    cache = loom.StaticCache(config=ours.config, max_cache_len=20)
    assert isinstance(cache, LayeredStaticCache) and any(cache.is_sliding)
    got = _stepwise(ours, cache, ids, mask, prefill)
    want = _stepwise(ref, transformers.StaticCache(config=ref.config, max_cache_len=20), ids, mask, prefill)
    with torch.no_grad():
        whole = ref(ids, attention_mask=mask).logits
    for expected in (want, whole):
        torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[0, 3:], expected[0, 3:], atol=1e-4, rtol=1e-4)
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    assert all(layer.keys.shape[-2] == 4 for layer in sliding)  # only the window is kept


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("how", ["past_key_values", "cache_implementation", "beams"])
def test_generate_with_static_caches_matches_the_reference(pair, how, padded):
    import transformers

    ours, ref = pair
    ids, mask = _ids()
    if not padded:
        mask = torch.ones_like(ids)

    def run(lib, model):
        kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask,
                  return_dict_in_generate=True, output_logits=True)
        if how == "cache_implementation":
            kw["cache_implementation"] = "static"
        else:
            kw["past_key_values"] = lib.StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
        if how == "beams":
            kw.update(num_beams=2, output_logits=False)
        return model.generate(ids, **kw)

    got, want = run(loom, ours), run(transformers, ref)
    assert got.sequences.tolist() == want.sequences.tolist()
    if how != "beams":
        rows = slice(None) if not padded else 1  # a padded row's logits at its padding differ by design
        torch.testing.assert_close(torch.stack(got.logits)[:, rows], torch.stack(want.logits)[:, rows],
                                   atol=1e-4, rtol=1e-4)
    if how == "past_key_values":
        assert isinstance(got.past_key_values, LayeredStaticCache)


def test_forward_over_dynamic_window_layers_matches_the_reference(pair):
    """`DynamicSlidingWindowLayer`s (what the reference's DynamicCache(config=) builds) keep window - 1 positions."""
    import transformers
    import transformers.cache_utils as ref_layers

    ours, ref = pair
    ids, mask = _ids(T=14)

    def layers(module):
        return [module.DynamicSlidingWindowLayer(sliding_window=w) if w else module.DynamicLayer()
                for w in ours.model.windows]

    got = _stepwise(ours, loom.Cache(layers=layers(cache_layers)), ids, mask, 6)
    want = _stepwise(ref, transformers.Cache(layers=layers(ref_layers)), ids, mask, 6)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0, 3:], want[0, 3:], atol=1e-4, rtol=1e-4)


def test_generate_continues_a_cache_that_holds_the_prompts_start(pair):
    """A cache holding the prompt's first positions: generate runs only the rest, as the reference does."""
    import transformers

    ours, ref = pair
    ids, _ = _ids(B=1, T=PROMPT)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    results = []
    for lib, model in ((loom, ours), (transformers, ref), (loom, ours)):
        cache = lib.StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
        with torch.no_grad():
            model(ids[:, :6], past_key_values=cache, use_cache=True)
        # `cache=` is the reference's newer name for past_key_values; loom's generate takes both
        name = "cache" if len(results) == 2 else "past_key_values"
        results.append(model.generate(ids, **{name: cache}, **kw).tolist())
    assert results[0] == results[1] == results[2] == [ours.generate(ids, **kw)[0].tolist()]


def test_mistral_default_window_is_longer_than_the_cache(tmp_path):
    """Mistral's sliding_window defaults to 4096: its static cache's window layers are max_cache_len long."""
    config = loom.MistralConfig(**{k: v for k, v in TINY["mistral"].items() if k != "sliding_window"})
    torch.manual_seed(0)
    model = loom.MistralForCausalLM(config).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cache = loom.StaticCache(config=config, max_cache_len=16)
    assert [layer.max_cache_len for layer in cache.layers] == [16, 16]
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, past_key_values=cache, **kw), model.generate(ids, **kw))


def test_layers_of_one_window_may_hold_different_spans(pair):
    """A cache whose layers of one window keep different spans (e.g. built from layer_types that disagree with the
    layers the model slides, as a Qwen3-MoE config may have): each layer gets its own mask, so the logits are the
    reference's uncached forward's (the reference's own model builds one mask per window and fails here)."""
    ours, ref = pair
    ids, mask = _ids(T=14)
    windows = ours.model.windows
    layers = [cache_layers.StaticLayer(max_cache_len=20)]  # the first layer keeps everything, whatever its window
    layers += [cache_layers.StaticSlidingWindowLayer(max_cache_len=20, sliding_window=w) if w
               else cache_layers.StaticLayer(max_cache_len=20) for w in windows[1:]]
    got = _stepwise(ours, loom.Cache(layers=layers), ids, mask, 6)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0, 3:], want[0, 3:], atol=1e-4, rtol=1e-4)


def test_a_one_mask_family_refuses_layers_of_different_spans():
    config = loom.GPT2Config(**TINY["gpt2"])
    model = loom.GPT2LMHeadModel(config).eval()
    cache = loom.Cache(layers=[cache_layers.StaticSlidingWindowLayer(max_cache_len=16, sliding_window=2),
                               cache_layers.StaticLayer(max_cache_len=16)])
    with pytest.raises(ValueError, match=r"its layers hold different spans of positions"):
        model(torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)


def test_generate_cache_arguments_errors():
    config = loom.MistralConfig(**TINY["mistral"])
    model = loom.MistralForCausalLM(config).eval()
    ids = torch.tensor([[5, 6, 7]])
    cache = loom.StaticCache(config=config, max_cache_len=16)
    with pytest.raises(ValueError, match="both past_key_values and cache_implementation='static'"):
        model.generate(ids, past_key_values=cache, cache_implementation="static", max_new_tokens=2)
    with pytest.raises(ValueError, match="past_key_values with use_cache=False"):
        model.generate(ids, past_key_values=cache, use_cache=False, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"takes a cache .* got list"):
        model.generate(ids, past_key_values=[], max_new_tokens=2)
    with pytest.raises(ValueError, match="both past_key_values and cache, two names"):
        model.generate(ids, past_key_values=cache, cache=cache, max_new_tokens=2)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="holds 3 positions but the prompt has 3"):
        model.generate(ids, past_key_values=cache, max_new_tokens=2)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_into_loom_caches_matches_its_own_cache(padded):
    """A DynamicCache or a (buffered) StaticCache passed to generate takes the same fused decode steps as the
    caches generate builds: same tokens, and bitwise the same logits for the dynamic one."""
    config = loom.LlamaConfig(**TINY["llama"])
    torch.manual_seed(0)
    model = loom.LlamaForCausalLM(config).eval()
    ids, mask = _ids()
    if not padded:
        mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask,
              return_dict_in_generate=True, output_logits=True)
    own = model.generate(ids, **kw)
    into_dynamic = model.generate(ids, past_key_values=loom.DynamicCache(), **kw)
    static = loom.StaticCache(config=config, max_batch_size=2, max_cache_len=PROMPT + NEW)
    assert type(static) is loom.StaticCache  # full attention only: the buffered layout
    into_static = model.generate(ids, past_key_values=static, **kw)
    assert own.sequences.tolist() == into_dynamic.sequences.tolist() == into_static.sequences.tolist()
    assert all(torch.equal(a, b) for a, b in zip(own.logits, into_dynamic.logits))
    torch.testing.assert_close(torch.stack(into_static.logits), torch.stack(own.logits), atol=1e-5, rtol=1e-5)
