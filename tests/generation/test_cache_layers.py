"""The reference's public cache API on loom's caches: `cache.layers` (DynamicLayer/StaticLayer views), the
`key_states=`/`value_states=` update keywords, `get_max_length`, `get_mask_sizes`, `batch_select_indices`, 5.x's
negative `crop`, and the IndexError of a full static cache, each against the reference's caches on the same updates."""
from __future__ import annotations

import pytest
import torch
import transformers

import loom
from loom.models.cache import DynamicLayer, StaticLayer


def _kv(batch: int, steps: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 2, steps, 4, generator=torch.Generator().manual_seed(seed))


def _fill(cache, steps=(3, 1, 1), layers=2, batch=3):
    for i, n in enumerate(steps):
        for layer in range(layers):
            kv = _kv(batch, n, 10 * i + layer)
            cache.update(key_states=kv, value_states=-kv, layer_idx=layer)
    return cache


def _assert_same_layers(ours, ref):
    assert len(ours.layers) == len(ref.layers)
    for mine, theirs in zip(ours.layers, ref.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        assert mine.get_seq_length() == theirs.get_seq_length()
        assert mine.get_max_length() == theirs.get_max_length()


def test_dynamic_cache_layers_match_the_reference():
    ours, ref = _fill(loom.DynamicCache()), _fill(transformers.DynamicCache())
    assert all(isinstance(layer, DynamicLayer) for layer in ours.layers)
    _assert_same_layers(ours, ref)
    assert ours.get_max_length() == ref.get_max_length() == -1
    assert ours.get_mask_sizes(2, 1) == ref.get_mask_sizes(2, 1) == (7, 0)
    assert ours.get_mask_sizes(2, 5) == ref.get_mask_sizes(2, 5)  # a layer not created yet

    for cache in (ours, ref):
        cache.batch_select_indices((0, 2))
        cache.crop(-2)  # 5.x: remove two positions
    _assert_same_layers(ours, ref)
    assert ours.layers[0].keys.shape == (2, 2, 3, 4)


def test_dynamic_cache_crop_keeps_the_absolute_length_of_earlier_versions():
    cache = _fill(loom.DynamicCache())
    cache.crop(4)
    assert cache.get_seq_length() == 4
    cache.crop(-10)
    assert cache.get_seq_length() == 0 and cache.layers[1].keys.numel() == 0


def test_static_cache_layers_match_the_reference():
    kwargs = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16)
    ours = loom.StaticCache(config=loom.LlamaConfig(**kwargs), max_cache_len=6, max_batch_size=3)
    ref = transformers.StaticCache(config=transformers.LlamaConfig(**kwargs), max_cache_len=6)
    _fill(ours), _fill(ref)
    assert all(isinstance(layer, StaticLayer) for layer in ours.layers)
    _assert_same_layers(ours, ref)
    assert ours.get_max_length() == ref.get_max_length() == 6
    assert ours.layers[0].max_cache_len == ref.layers[0].max_cache_len == 6
    assert ours.get_mask_sizes(1, 0) == ref.get_mask_sizes(1, 0)


def test_full_static_cache_raises_index_error_like_the_reference():
    config = loom.LlamaConfig(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, hidden_size=4)
    cache = loom.StaticCache(config=config, max_cache_len=2)
    kv = torch.ones(1, 1, 2, 4)
    cache.update(key_states=kv, value_states=kv, layer_idx=0)
    with pytest.raises(IndexError, match="position 2 does not fit in max_cache_len=2"):
        cache.update(key_states=kv[..., :1, :], value_states=kv[..., :1, :], layer_idx=0)
