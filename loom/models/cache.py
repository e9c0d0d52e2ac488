"""KV caches for decoder models.

`DynamicCache` grows its buffers geometrically (amortised O(1) appends instead of a torch.cat per step), and
`StaticCache` preallocates `max_cache_len` so the decode step has fixed shapes (torch.compile friendly). Both hand the
attention the keys/values for positions [0, seq_length) of every row.

`cache.layers` shows the reference's per-layer objects (`DynamicLayer`, `StaticLayer`: `.keys`, `.values`,
`get_seq_length()`, ...) as views over these buffers, built when read; the decode path never builds them, so it pays
nothing for them.
"""
from __future__ import annotations

import math
import os

import torch

from loom.models.cache_layers import (STATIC_LAYER_TYPES, CacheLayerMixin, CacheOverflowError, DummyLayer,
                                      DynamicIndexedLayer, DynamicLayer, DynamicSlidingWindowLayer,
                                      LinearAttentionAndFullAttentionLayer,
                                      LinearAttentionAndSlidingWindowAttentionLayer, LinearAttentionLayer, StaticLayer,
                                      StaticSlidingWindowLayer, layer_types_and_kwargs)

__all__ = ["Cache", "DynamicCache", "StaticCache", "CacheLayerMixin", "DynamicLayer", "DynamicSlidingWindowLayer",
           "DynamicIndexedLayer", "StaticLayer", "StaticSlidingWindowLayer", "LinearAttentionLayer",
           "LinearAttentionAndFullAttentionLayer", "LinearAttentionAndSlidingWindowAttentionLayer", "DummyLayer",
           "CacheOverflowError"]


class CacheLayer:
    """One layer of loom's buffered caches, as the reference's layer object: a view whose `keys`/`values` read the
    cache's buffers (mixed into `DynamicLayer`/`StaticLayer`, so isinstance checks hold)."""

    is_initialized = True

    def __init__(self, cache: "Cache", layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    @property
    def keys(self) -> torch.Tensor:
        return self.cache.keys[self.layer_idx]

    @property
    def values(self) -> torch.Tensor:
        return self.cache.values[self.layer_idx]

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        """The most positions this layer holds; -1 when it grows without bound."""
        return self.cache.get_max_length(self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys a query of `query_length` new tokens attends to."""
        max_length = self.get_max_length()
        return (max_length if max_length >= 0 else self.get_seq_length() + query_length), 0

    def _on_cache(self, method: str, *args):
        raise NotImplementedError(f"{type(self.cache).__name__}.layers[{self.layer_idx}].{method}: this layer is a "
                                  f"view of the cache's shared buffers; call cache.{method}(...) on the whole cache")

    def crop(self, tokens_to_remove: int) -> None:
        self._on_cache("crop")

    def reset(self) -> None:
        self._on_cache("reset")

    def reorder_cache(self, beam_idx) -> None:
        self._on_cache("reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._on_cache("batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        self._on_cache("batch_select_indices")

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # the cache's buffers exist already


class _DynamicLayerView(CacheLayer, DynamicLayer):
    """A layer of a `DynamicCache`: `keys`/`values` are the positions stored so far (B, Hkv, T, D)."""

    @property
    def keys(self) -> torch.Tensor:
        return super().keys[..., :self.get_seq_length(), :]

    @property
    def values(self) -> torch.Tensor:
        return super().values[..., :self.get_seq_length(), :]


class _StaticLayerView(CacheLayer, StaticLayer):
    """A layer of a `StaticCache`: `keys`/`values` are the whole preallocated buffers (B, Hkv, max_cache_len, D)."""

    @property
    def max_cache_len(self) -> int:
        return self.cache.max_cache_len


class Cache:
    """Per-layer key/value store. `update` appends and returns the keys/values to attend to.

    `Cache(layers=[...])` or `Cache(layer_class_to_replicate=DynamicLayer)`, as in the reference, is a
    `LayeredCache` of those layer objects."""

    layer_class = CacheLayer

    def __new__(cls, *args, **kwargs):
        return super().__new__(LayeredCache if cls is Cache else cls)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, Hkv, T, D) keys/values of `layer_idx` (at `cache_position`, where the cache places tokens by
        position) and return the keys/values to attend to. One signature for every cache."""
        raise NotImplementedError

    @property
    def layers(self) -> list[CacheLayer]:
        """The reference's per-layer objects, as views over this cache's buffers."""
        return [self.layer_class(self, i) for i in range(len(self))]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError

    def get_max_cache_shape(self) -> int | None:
        return None

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """The most positions the cache holds (-1: no bound), as the reference's `Cache.get_max_length`."""
        max_shape = self.get_max_cache_shape()
        return -1 if max_shape is None else max_shape

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx >= len(self):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError

    def batch_repeat_interleave(self, repeats: int) -> None:
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].repeat_interleave(repeats, dim=0)
            self.values[i] = self.values[i].repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices) -> None:
        """Keep only the batch rows `indices` (a sequence or tensor of row numbers)."""
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i][indices, ...]
            self.values[i] = self.values[i][indices, ...]

    def __len__(self) -> int:
        return len(getattr(self, "keys", []))


class DynamicCache(Cache):
    """Cache whose length grows with each forward; buffers double in capacity to avoid a copy per step."""

    layer_class = _DynamicLayerView

    def __init__(self, *args, **kwargs) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length: list[int] = []

    def update(self, key_states, value_states, layer_idx, cache_position=None):  # appends after the tokens seen
        new = key_states.shape[-2]
        if layer_idx == len(self.keys):  # first call for this layer
            cap = max(new, 16)
            k = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
            v = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
            self.keys.append(k)
            self.values.append(v)
            self.length.append(0)
        start = self.length[layer_idx]
        end = start + new
        if end > self.keys[layer_idx].shape[-2]:
            self._grow(layer_idx, end)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[..., start:end, :] = key_states
        v[..., start:end, :] = value_states
        self.length[layer_idx] = end
        return k[..., :end, :], v[..., :end, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length[layer_idx] if layer_idx < len(self.length) else 0

    def next_length(self, layer_idx: int) -> int:
        """How many positions a fused decode step of `layer_idx` attends to (its mask's length)."""
        return self.length[layer_idx] + 1

    def decode_slot(self, layer_idx: int, cache_position):
        """For a fused decode step that writes one token itself: (keys, values, position, length) of `layer_idx`,
        the buffers grown to hold one more token and the token counted. The caller checked `layer_idx < len(self)`
        and the buffers' dtype and shape."""
        start = self.length[layer_idx]
        if start == self.keys[layer_idx].shape[-2]:
            self._grow(layer_idx, start + 1)
        self.length[layer_idx] = start + 1
        return self.keys[layer_idx], self.values[layer_idx], start, start + 1

    def _grow(self, layer_idx: int, end: int) -> None:
        """Reallocate a layer's buffers for at least `end` positions (and at least double), keeping what they hold."""
        k, v, start = self.keys[layer_idx], self.values[layer_idx], self.length[layer_idx]
        cap = max(end, 2 * k.shape[-2])
        k2 = k.new_empty(*k.shape[:-2], cap, k.shape[-1])
        v2 = v.new_empty(*v.shape[:-2], cap, v.shape[-1])
        k2[..., :start, :] = k[..., :start, :]
        v2[..., :start, :] = v[..., :start, :]
        self.keys[layer_idx], self.values[layer_idx] = k2, v2

    def reorder_cache(self, beam_idx):
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, beam_idx.to(self.keys[i].device))
            self.values[i] = self.values[i].index_select(0, beam_idx.to(self.values[i].device))

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions; a negative value removes that many from the end (the reference's
        5.x meaning; a positive one is its earlier one)."""
        self.length = [max(n + max_length, 0) if max_length < 0 else min(n, max_length) for n in self.length]

    def to_legacy_cache(self) -> tuple:
        return tuple((self.keys[i][..., :n, :], self.values[i][..., :n, :]) for i, n in enumerate(self.length))


class StaticCache(Cache):
    """Preallocated cache of `max_cache_len` positions; attention always sees the whole buffer (masked).

    Built from a config whose `layer_types` name other kinds than full attention (sliding-window or chunked layers,
    linear attention, ...), it is a `LayeredStaticCache`, as the reference builds it: those layers keep only their
    window (or their conv/recurrent states), and the models' masks map each layer's slots to their positions
    (`common.layered_inputs`). `generate(cache_implementation="static")` builds the buffered layout instead,
    `StaticCache.whole_sequence`, which the fused decode paths and torch.compile read."""

    layer_class = _StaticLayerView

    def __new__(cls, config=None, *args, **kwargs):
        if cls is StaticCache and config is not None and _needs_layers(config):
            return super().__new__(LayeredStaticCache)
        return super().__new__(cls)

    @classmethod
    def whole_sequence(cls, config, **kwargs) -> "StaticCache":
        """A buffered static cache whose every layer keeps all `max_cache_len` positions, whatever the config's
        `layer_types` (the layout loom's models and the fused decode path read)."""
        cache = object.__new__(StaticCache)
        cache.__init__(config, **kwargs)
        return cache

    def __init__(self, config=None, max_batch_size: int = 1, max_cache_len: int = 0, device=None, dtype=None,
                 num_layers: int | None = None, num_kv_heads: int | None = None, head_dim: int | None = None) -> None:
        if config is not None:
            num_layers = num_layers or config.num_hidden_layers
            heads = config.num_attention_heads
            num_kv_heads = num_kv_heads or getattr(config, "num_key_value_heads", None) or heads
            head_dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads
        if not (num_layers and num_kv_heads and head_dim and max_cache_len > 0):
            raise ValueError("StaticCache needs a config (or num_layers/num_kv_heads/head_dim) and max_cache_len > 0")
        shape = (max_batch_size, num_kv_heads, max_cache_len, head_dim)
        dtype = dtype or torch.float32
        _check_fits(2 * num_layers * math.prod(shape) * dtype.itemsize, max_cache_len, device)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_cache_len = max_cache_len
        # Tokens written so far, as a tensor: the compiled decode step updates it in place, where a Python int would
        # be read back from the device and, read inside the compiled region, recompile the step for every value.
        self.seen = torch.zeros((), dtype=torch.long, device=device)

    def update(self, key_states, value_states, layer_idx, cache_position: torch.Tensor | None = None):
        """Write `key`/`value` (B, Hkv, T, D) at `cache_position` (T positions, a tensor) and return the whole buffers.

        Without `cache_position` the tokens follow the ones seen so far (a host read of `seen`; the models always pass
        positions)."""
        key, value = key_states, value_states
        if cache_position is None:
            start = int(self.seen) - (key.shape[-2] if layer_idx else 0)  # layer 0 already counted these tokens
            cache_position = torch.arange(start, start + key.shape[-2], device=key.device)
        # The bounds check reads a position back to the host: fine eagerly, but inside torch.compile it would break
        # the graph (and the caller, the Decoder, sizes the cache so that it never overflows).
        if not torch.compiler.is_compiling():
            self._check_fits(int(cache_position[-1]))
        self.keys[layer_idx].index_copy_(2, cache_position, key.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, cache_position, value.to(self.values[layer_idx].dtype))
        if layer_idx == 0:
            self.seen.copy_(cache_position[-1] + 1)
        return self.keys[layer_idx], self.values[layer_idx]

    def _check_fits(self, position: int) -> None:
        if position >= self.max_cache_len:
            raise CacheOverflowError(f"StaticCache is full: position {position} does not fit in "
                                     f"max_cache_len={self.max_cache_len}; create the cache with a larger "
                                     "max_cache_len")

    def next_length(self, layer_idx: int) -> int:
        return self.max_cache_len

    def decode_slot(self, layer_idx: int, cache_position):
        """For a fused decode step that writes one token itself (eager only: reads the position back to the host):
        (keys, values, position, length); the attention reads the whole buffer, masked. None where no single
        position is given, so the caller takes `update`."""
        if cache_position is None or cache_position.numel() != 1:
            return None
        position = int(cache_position)
        self._check_fits(position)
        if layer_idx == 0:
            self.seen.fill_(position + 1)
        return self.keys[layer_idx], self.values[layer_idx], position, self.max_cache_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seen)

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def reorder_cache(self, beam_idx):
        for i in range(len(self.keys)):
            self.keys[i].copy_(self.keys[i].index_select(0, beam_idx))
            self.values[i].copy_(self.values[i].index_select(0, beam_idx))

    def reset(self) -> None:
        for k, v in zip(self.keys, self.values):
            k.zero_()
            v.zero_()
        self.seen.zero_()


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _needs_layers(config) -> bool:
    """Whether a config's layers are not all full attention (so a reference-style static cache keeps less)."""
    config = _text_config(config)
    types = getattr(config, "layer_types", None)
    if types is None:  # as layer_types_and_kwargs reads such a config, without needing num_hidden_layers
        return any(getattr(config, name, None) is not None for name in ("sliding_window", "attention_chunk_size"))
    types, _ = layer_types_and_kwargs(config)
    return any(t != "full_attention" for t in types)


class LayeredCache(Cache):
    """A cache made of the reference's standalone layer objects (`cache_layers.py`), one per model layer; every
    call goes to the layer it names."""

    def __init__(self, layers: list | None = None, layer_class_to_replicate: type | None = None,
                 offloading: bool = False, offload_only_non_sliding: bool = True) -> None:
        if (layers is None) == (layer_class_to_replicate is None):
            raise ValueError("Cache(...) takes exactly one of layers= (the layer objects, one per model layer) or "
                             "layer_class_to_replicate= (a layer class, instantiated for each layer as it is updated)")
        if offloading:
            raise ValueError("Cache(offloading=True): loom does not offload cache layers to the CPU; leave "
                             "offloading=False")
        self._layers = list(layers) if layers is not None else []
        self.layer_class_to_replicate = layer_class_to_replicate

    @property
    def layers(self) -> list:
        return self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self._layers})"

    def _layer(self, layer_idx: int, method: str):
        if not 0 <= layer_idx < len(self._layers):
            raise IndexError(f"{type(self).__name__}.{method}: layer_idx={layer_idx} is out of range for a cache of "
                             f"{len(self._layers)} layers")
        return self._layers[layer_idx]

    def update(self, key_states, value_states, layer_idx, cache_position=None, *args, **kwargs):
        """Store (B, H, T, D) keys/values of `layer_idx` after the ones it holds; return what to attend to. The
        layers count positions themselves, so `cache_position` is not read (as in the reference)."""
        if self.layer_class_to_replicate is not None:
            while len(self._layers) <= layer_idx:
                self._layers.append(self.layer_class_to_replicate())
        layer = self._layer(layer_idx, "update")
        if not hasattr(layer, "update"):
            raise ValueError(f"{type(self).__name__}.update: layer {layer_idx} is a {type(layer).__name__}, which "
                             "keeps no keys/values; use update_conv_state / update_recurrent_state")
        return layer.update(key_states, value_states)

    def _linear(self, layer_idx: int, method: str):
        layer = self._layer(layer_idx, method)
        if not isinstance(layer, LinearAttentionLayer):
            raise ValueError(f"{type(self).__name__}.{method}: layer {layer_idx} is a {type(layer).__name__}, not a "
                             "linear-attention layer")
        return layer

    def update_conv_state(self, conv_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self._linear(layer_idx, "update_conv_state").update_conv_state(conv_states, state_idx, **kwargs)

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self._linear(layer_idx, "update_recurrent_state").update_recurrent_state(recurrent_states, state_idx,
                                                                                        **kwargs)

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        layer = self._linear(layer_idx, "get_conv_state")
        return layer.conv_states[state_idx] if layer.has_previous_state[state_idx] else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        layer = self._linear(layer_idx, "get_recurrent_state")
        return layer.recurrent_states[state_idx] if layer.has_previous_state[state_idx] else None

    def update_indexer(self, indexer_key_states, layer_idx: int):
        layer = self._layer(layer_idx, "update_indexer")
        if not hasattr(layer, "update_indexer"):
            raise ValueError(f"{type(self).__name__}.update_indexer: layer {layer_idx} is a {type(layer).__name__}, "
                             "which has no indexer key cache")
        return layer.update_indexer(indexer_key_states)

    def early_initialization(self, batch_size: int, num_heads, head_dim, dtype: torch.dtype, device) -> None:
        """Allocate every key/value layer now (they otherwise allocate on their first update); `num_heads` and
        `head_dim` are ints or one value per layer. Linear-attention layers take their shapes on their first update."""
        n = len(self._layers)
        per_layer = []
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            value = [value] * n if isinstance(value, int) else list(value)
            if len(value) != n:
                raise ValueError(f"early_initialization({name}=...) lists {len(value)} values for a cache of {n} "
                                 "layers; pass an int or one value per layer")
            per_layer.append(value)
        for layer, heads, dim in zip(self._layers, *per_layer):
            if layer.supports_early_init and not layer.is_initialized:
                empty = torch.zeros(batch_size, heads, 0, dim, dtype=dtype, device=device)
                layer.lazy_initialization(empty, empty)

    @property
    def is_initialized(self) -> bool:
        layers = [layer for layer in self._layers if layer.supports_early_init]
        return bool(layers) and all(layer.is_initialized for layer in layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [layer.is_sliding for layer in self._layers]

    @property
    def is_compileable(self) -> bool:
        return bool(self._layers) and all(layer.is_compileable for layer in self._layers)

    @property
    def is_croppable(self) -> bool:
        return all(layer.is_croppable for layer in self._layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self._layers[layer_idx].get_seq_length()) if layer_idx < len(self._layers) else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        if layer_idx is None:
            return max((layer.get_max_length() for layer in self._layers), default=-1)
        return self._layers[layer_idx].get_max_length() if layer_idx < len(self._layers) else -1

    def get_max_cache_shape(self) -> int | None:
        length = self.get_max_length()
        return None if length < 0 else length

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx >= len(self._layers) or not hasattr(self._layers[layer_idx], "get_mask_sizes"):
            return query_length, 0
        return self._layers[layer_idx].get_mask_sizes(query_length)

    def activate_past_recording(self, **kwargs) -> None:
        for layer in self._layers:
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording(**kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self._layers:
            layer.crop(tokens_to_remove)

    def reset(self) -> None:
        for layer in self._layers:
            layer.reset()

    def reorder_cache(self, beam_idx) -> None:
        for layer in self._layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self._layers:
            if hasattr(layer, "batch_repeat_interleave"):
                layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        for layer in self._layers:
            if hasattr(layer, "batch_select_indices"):
                layer.batch_select_indices(indices)


class LayeredStaticCache(LayeredCache, StaticCache):
    """What `StaticCache(config, max_cache_len)` is for a config whose `layer_types` are not all full attention:
    one reference-style layer per `layer_types` entry (static full layers, static sliding-window layers for sliding
    and chunked attention, linear-attention layers), each allocated on its first update or by
    `early_initialization`."""

    def __init__(self, config=None, max_batch_size: int = 1, max_cache_len: int = 0, device=None, dtype=None,
                 *args, **kwargs) -> None:
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"StaticCache(max_cache_len={max_cache_len!r}) must be a positive int")
        types, per_layer = layer_types_and_kwargs(_text_config(config))
        unknown = sorted({t for t in types if t not in STATIC_LAYER_TYPES})
        if unknown:
            raise ValueError(f"StaticCache: config layer_types names {unknown}, which loom's static cache does not "
                             f"build; known kinds: {sorted(STATIC_LAYER_TYPES)}")
        LayeredCache.__init__(self, [STATIC_LAYER_TYPES[t](max_cache_len=max_cache_len, **kw)
                                     for t, kw in zip(types, per_layer)])
        self.max_cache_len = max_cache_len


def _check_fits(nbytes: int, max_cache_len: int, device) -> None:
    """A static cache larger than its device's memory is refused before any allocation is tried (a huge max_length
    would otherwise ask the allocator for terabytes, or on Linux let the kernel kill the process while zeroing)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        room = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        room = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if nbytes > room:
        raise ValueError(f"a StaticCache of max_cache_len={max_cache_len} positions needs {nbytes / 2**30:.1f} GiB, "
                         f"more than the {room / 2**30:.1f} GiB of {device}; give it the length you need (generate "
                         "sizes it to the prompt plus max_new_tokens), or use the dynamic cache, which grows")
