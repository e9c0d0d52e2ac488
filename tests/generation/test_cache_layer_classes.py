"""The reference's standalone cache layers (loom/models/cache_layers.py) and `StaticCache` built from a config's
`layer_types`, each against the reference's classes on the same updates; plus the errors and the guarantee that
loom's own generate keeps its whole-sequence static cache. Models reading window-only caches:
test_window_static_cache.py."""
from __future__ import annotations

import pytest
import torch
import transformers
import transformers.cache_utils as ref_layers

import loom
from loom.models import cache_layers
from loom.models.cache import LayeredStaticCache, StaticCache

LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer", "LinearAttentionLayer",
          "LinearAttentionAndFullAttentionLayer", "LinearAttentionAndSlidingWindowAttentionLayer")


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _drive(layer, steps, record: bool, crop: int | None):
    """Feed attention, conv and indexer states of `steps` tokens per call; crop at the end. Returns what each
    update returned."""
    if record and hasattr(layer, "activate_past_recording"):
        layer.activate_past_recording()
    returned = []
    for i, n in enumerate(steps):
        if hasattr(layer, "update"):
            returned += list(layer.update(_rand(2, 3, n, 4, seed=i), _rand(2, 3, n, 4, seed=100 + i)))
        if hasattr(layer, "update_conv_state"):
            returned.append(layer.update_conv_state(conv_states=_rand(2, 5, n, seed=200 + i), conv_kernel_size=3))
        if hasattr(layer, "update_indexer"):
            returned.append(layer.update_indexer(_rand(2, n, 4, seed=300 + i)))
    if crop is not None:
        layer.crop(crop)
    return returned


def _state(layer):
    out = {}
    for name in ("keys", "values", "indexer_keys"):
        if getattr(layer, name, None) is not None:
            out[name] = getattr(layer, name)
    if hasattr(layer, "conv_states"):
        out["conv"] = layer.conv_states[0]
    # cropping more than was stored leaves the reference's count negative; loom's stops at 0
    out["seq"] = max(int(layer.get_seq_length()), 0)
    out["max"] = layer.get_max_length()
    return out


DRIVES = [((5,), True, -2), ((9, 1, 2), True, -3), ((9,), True, 0), ((9,), True, -20), ((3, 1), False, None),
          ((2,), False, -1)]
# linear layers crop only what they recorded (tested below): no unrecorded crops for them
LAYER_DRIVES = [(name, *drive) for name in LAYERS for drive in DRIVES
                if not ("Linear" in name and not drive[1] and drive[2] is not None)]


@pytest.mark.parametrize("name,steps,record,crop", LAYER_DRIVES)
def test_layer_matches_the_reference(name, steps, record, crop):
    ours, ref = getattr(cache_layers, name)(sliding_window=6), getattr(ref_layers, name)(sliding_window=6)
    mine, theirs = _drive(ours, steps, record, crop), _drive(ref, steps, record, crop)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    mine, theirs = _state(ours), _state(ref)
    assert mine.keys() == theirs.keys()
    for key in mine:
        if isinstance(mine[key], torch.Tensor):
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
        else:
            assert mine[key] == theirs[key], key
    assert hasattr(ours, "sliding_window") == hasattr(ref, "sliding_window")
    if hasattr(ours, "get_mask_sizes") and (crop is None or -crop <= sum(steps)):  # (the reference's goes negative)
        assert ours.get_mask_sizes(2) == ref.get_mask_sizes(2)


def _config(layer_types, cls=loom.Gemma2Config, **overrides):
    kwargs = dict(num_hidden_layers=len(layer_types), num_key_value_heads=1, num_attention_heads=1, head_dim=2,
                  hidden_size=2, sliding_window=3, attention_chunk_size=3)
    kwargs.update(overrides)
    config = cls(**kwargs)
    config.layer_types = layer_types  # set afterwards, as the reference's tests do (Gemma2 checks the kinds it runs)
    return config


@pytest.mark.parametrize("layer_types,max_cache_len", [
    (["full_attention", "sliding_attention"], 5), (["sliding_attention"], 3), (["chunked_attention"], 6),
    (["full_attention", "chunked_attention"], 2)])
def test_static_cache_from_layer_types_matches_the_reference(layer_types, max_cache_len):
    ours = StaticCache(config=_config(layer_types), max_cache_len=max_cache_len)
    ref = transformers.StaticCache(config=_config(layer_types, transformers.Gemma2Config), max_cache_len=max_cache_len)
    assert isinstance(ours, LayeredStaticCache) and isinstance(ours, StaticCache)
    assert [type(layer).__name__ for layer in ours.layers] == [type(layer).__name__ for layer in ref.layers]
    # a full-attention layer holds max_cache_len positions; the windowed ones keep sliding past it
    steps = (1, 1) if max_cache_len == 2 else (2, 1, 1, 1) if "full_attention" in layer_types else (2, 1, 2, 1, 1)
    for i, n in enumerate(steps):
        for layer_idx in range(len(layer_types)):
            kv = _rand(1, 1, n, 2, seed=10 * i + layer_idx)
            assert ours.get_mask_sizes(n, layer_idx) == ref.get_mask_sizes(n, layer_idx)
            mine, theirs = ours.update(kv, -kv, layer_idx), ref.update(kv, -kv, layer_idx)
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
            torch.testing.assert_close(ours.layers[layer_idx].keys, ref.layers[layer_idx].keys, rtol=0, atol=0)
            assert ours.get_seq_length(layer_idx) == int(ref.get_seq_length(layer_idx))
    assert ours.get_max_length() == ref.get_max_length()
    assert ours.is_sliding == ref.is_sliding


def test_static_cache_with_a_linear_attention_layer():
    config = loom.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
    config.layer_types = ["full_attention", "linear_attention"]
    cache = StaticCache(config=config, max_cache_len=8)
    assert isinstance(cache.layers[0], loom.StaticLayer)
    assert isinstance(cache.layers[1], cache_layers.LinearAttentionLayer)
    assert cache.get_max_length() == 8 and not cache.is_initialized
    assert cache.layers[0].supports_early_init and not cache.layers[1].supports_early_init
    cache.early_initialization(batch_size=1, num_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    assert cache.is_initialized and cache.layers[0].keys.shape == (1, 2, 8, 8)
    conv = _rand(1, 8, 4, seed=0)
    torch.testing.assert_close(cache.update_conv_state(conv, 1), conv)
    recurrent = _rand(1, 2, 3, seed=1)
    torch.testing.assert_close(cache.update_recurrent_state(recurrent, 1), recurrent)
    torch.testing.assert_close(cache.get_recurrent_state(1), recurrent)
    with pytest.raises(ValueError, match="layer 1 is a LinearAttentionLayer, which keeps no keys/values"):
        cache.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), 1)
    with pytest.raises(ValueError, match="layer 0 is a StaticLayer, not a linear-attention layer"):
        cache.update_conv_state(conv, 0)
    with pytest.raises(ValueError, match=r"early_initialization\(num_heads=...\) lists 3 values for a cache of 2"):
        cache.early_initialization(batch_size=1, num_heads=[2, 2, 2], head_dim=8, dtype=torch.float32, device="cpu")


def test_linear_layer_rolls_back_recurrent_states_like_the_reference():
    ours, ref = cache_layers.LinearAttentionLayer(), ref_layers.LinearAttentionLayer()
    for layer in (ours, ref):
        layer.activate_past_recording()
        layer.update_conv_state(_rand(1, 4, 5, seed=0), conv_kernel_size=3)
        layer.update_recurrent_state([_rand(1, 2, seed=i) for i in range(5)])
        layer.crop(-2)
    torch.testing.assert_close(ours.recurrent_states[0], ref.recurrent_states[0], rtol=0, atol=0)
    torch.testing.assert_close(ours.conv_states[0], ref.conv_states[0], rtol=0, atol=0)


def test_full_attention_configs_keep_the_buffered_static_cache():
    config = loom.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16)
    assert type(StaticCache(config=config, max_cache_len=4)) is StaticCache
    windowed = _config(["full_attention", "sliding_attention"])
    whole = StaticCache.whole_sequence(windowed, max_cache_len=4)
    assert type(whole) is StaticCache and whole.keys[1].shape[-2] == 4


def test_bad_layer_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"sliding_window=0\): the window must be a positive int"):
        cache_layers.DynamicSlidingWindowLayer(sliding_window=0)
    with pytest.raises(ValueError, match=r"StaticSlidingWindowLayer\(sliding_window=None\)"):
        cache_layers.StaticSlidingWindowLayer(max_cache_len=4, sliding_window=None)
    with pytest.raises(ValueError, match=r"StaticLayer\(max_cache_len=0\) must be a positive int"):
        cache_layers.StaticLayer(max_cache_len=0)
    with pytest.raises(TypeError, match=r"crop\(tokens_to_remove=...\) takes an int, got float"):
        cache_layers.DynamicLayer().crop(-1.0)
    with pytest.raises(ValueError, match=r"config.sliding_window=None; set sliding_window"):
        StaticCache(config=_config(["sliding_attention"], sliding_window=None), max_cache_len=4)
    with pytest.raises(ValueError, match=r"names \['indexed_attention'\], which loom's static cache does not build"):
        StaticCache(config=_config(["indexed_attention"]), max_cache_len=4)


def test_crop_errors_where_states_are_gone():
    layer = cache_layers.DynamicSlidingWindowLayer(sliding_window=3)
    layer.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    with pytest.raises(RuntimeError, match=r"call activate_past_recording\(\) before the updates"):
        layer.crop(-1)
    layer = cache_layers.DynamicSlidingWindowLayer(sliding_window=3)
    layer.activate_past_recording()
    layer.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    with pytest.raises(ValueError, match=r"crop\(tokens_to_remove=2\): once the window is full, pass a negative"):
        layer.crop(2)
    with pytest.raises(RuntimeError, match="did not keep its past states"):
        cache_layers.LinearAttentionLayer().crop(-1)
    static = cache_layers.StaticLayer(max_cache_len=4)
    with pytest.raises(ValueError, match=r"crop\(tokens_to_remove=1\): a static layer is cropped by a negative"):
        static.crop(1)
    full = cache_layers.StaticLayer(max_cache_len=2)
    full.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(IndexError, match="position 2 does not fit in max_cache_len=2"):
        full.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))


def test_dynamic_layer_positive_crop_keeps_that_length():
    """loom keeps the earlier meaning of a positive crop (the length to keep), as its DynamicCache.crop does; the
    reference 5.25 refuses it."""
    layer = cache_layers.DynamicLayer()
    keys = _rand(1, 1, 6, 2, seed=0)
    layer.update(keys, keys)
    layer.crop(4)
    torch.testing.assert_close(layer.keys, keys[..., :4, :])


def _tiny_qwen2():
    config = loom.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, vocab_size=100, sliding_window=4, use_sliding_window=True,
                              max_window_layers=1)
    torch.manual_seed(0)
    return loom.Qwen2ForCausalLM(config).eval()


def test_generate_with_a_static_cache_on_sliding_layers_still_matches_the_dynamic_one():
    model = _tiny_qwen2()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    dynamic = model.generate(ids, max_new_tokens=5, do_sample=False)
    static = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_cache_of_layer_objects_matches_the_reference():
    ours = loom.Cache(layers=[cache_layers.DynamicLayer(), cache_layers.DynamicSlidingWindowLayer(sliding_window=3)])
    ref = transformers.Cache(layers=[ref_layers.DynamicLayer(), ref_layers.DynamicSlidingWindowLayer(sliding_window=3)])
    grown = loom.Cache(layer_class_to_replicate=cache_layers.DynamicLayer)
    ref_grown = transformers.Cache(layer_class_to_replicate=ref_layers.DynamicLayer)
    for i, n in enumerate((3, 1, 2)):
        for layer_idx in (0, 1):
            kv = _rand(2, 1, n, 2, seed=10 * i + layer_idx)
            torch.testing.assert_close(ours.update(kv, -kv, layer_idx), ref.update(kv, -kv, layer_idx))
            torch.testing.assert_close(grown.update(kv, kv, layer_idx), ref_grown.update(kv, kv, layer_idx))
    assert len(grown) == len(ref_grown) == 2
    assert ours.get_mask_sizes(1, 1) == ref.get_mask_sizes(1, 1)
    assert ours.get_seq_length(1) == ref.get_seq_length(1) and ours.is_sliding == ref.is_sliding
    for cache in (ours, ref):
        cache.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(ours.layers[1].keys, ref.layers[1].keys)


def test_cache_constructor_errors():
    with pytest.raises(ValueError, match="takes exactly one of layers= .* or layer_class_to_replicate="):
        loom.Cache()
    with pytest.raises(ValueError, match=r"Cache\(offloading=True\): loom does not offload"):
        loom.Cache(layers=[cache_layers.DynamicLayer()], offloading=True)
    with pytest.raises(IndexError, match="update: layer_idx=3 is out of range for a cache of 1 layers"):
        loom.Cache(layers=[cache_layers.DynamicLayer()]).update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 3)


def test_layer_views_of_buffered_caches_send_mutations_to_the_cache():
    cache = loom.DynamicCache()
    cache.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), 0)
    with pytest.raises(NotImplementedError, match=r"DynamicCache.layers\[0\].crop: .* call cache.crop"):
        cache.layers[0].crop(-1)
    keys, _ = cache.layers[0].update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert keys.shape[-2] == 4 and cache.get_seq_length() == 4
