"""The reference's standalone per-layer cache objects, each holding its own tensors.

loom's own `DynamicCache`/`StaticCache` keep every layer in one list of buffers (the decode path reads them
directly); these classes are for what the reference builds from a config's `layer_types`: full, sliding-window and
chunked attention layers that keep only their window, linear-attention layers (conv/recurrent states), the hybrids
of both, and the indexed layers of sparse-attention models. A cache made of them (`LayeredCache`) delegates each call
to its layers. Semantics follow the reference's `cache_utils`: `update` returns the keys/values to attend to,
`crop(-n)` removes the last n tokens, and layers that recorded their past (`activate_past_recording`) can roll
back past their window.
"""
from __future__ import annotations

import torch


class CacheOverflowError(ValueError, IndexError):
    """A token position past a static cache's end. An IndexError too, which is what the reference raises there."""


def _check_crop(tokens_to_remove, name: str) -> int:
    if not isinstance(tokens_to_remove, int) or isinstance(tokens_to_remove, bool):
        raise TypeError(f"{name}.crop(tokens_to_remove=...) takes an int, got {type(tokens_to_remove).__name__}")
    return tokens_to_remove


class CacheLayerMixin:
    """Base of the attention cache layers: `keys`/`values` of shape (B, H, T, D), set on the first `update`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = True

    def __init__(self, **kwargs) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False

    def __repr__(self) -> str:
        return type(self).__name__

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError

    def get_seq_length(self) -> int:
        raise NotImplementedError

    def get_max_length(self) -> int:
        """The most positions this layer holds; -1 when it has no bound."""
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys a query of `query_length` new tokens attends to."""
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized and self.keys.numel():
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self.keys.numel():
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized and self.keys.numel():
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]


class DynamicLayer(CacheLayerMixin):
    """A layer that grows by concatenation: `keys`/`values` hold every position seen (B, H, T, D)."""

    is_croppable = True

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.keys = key_states.new_empty(*key_states.shape[:-2], 0, key_states.shape[-1])
        self.values = value_states.new_empty(*value_states.shape[:-2], 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` positions (a negative count, the 5.x meaning); a positive value is the
        length to keep (the earlier meaning, as `DynamicCache.crop` takes it)."""
        n = _check_crop(tokens_to_remove, type(self).__name__)
        if not self.is_initialized or n == 0:
            return
        keep = max(self.keys.shape[-2] + n, 0) if n < 0 else min(self.keys.shape[-2], n)
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]


class DynamicSlidingWindowLayer(DynamicLayer):
    """A dynamic layer of a sliding-window (or chunked) attention: keeps the last `sliding_window - 1` positions,
    which with the next token make the window; `activate_past_recording` keeps everything until the next `crop`."""

    is_sliding = True

    def __init__(self, sliding_window: int, **kwargs) -> None:
        if not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"DynamicSlidingWindowLayer(sliding_window={sliding_window!r}): the window must be a "
                             "positive int (the config's sliding_window or attention_chunk_size)")
        super().__init__()
        self.sliding_window = sliding_window
        self.cumulative_length = 0
        self.record_past = False

    def activate_past_recording(self, **kwargs) -> None:
        self.record_past = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if not self.record_past:
            kept = self.sliding_window - 1
            self.keys, self.values = keys[..., keys.shape[-2] - min(kept, keys.shape[-2]):, :], \
                values[..., values.shape[-2] - min(kept, values.shape[-2]):, :]
            return keys, values
        self.keys, self.values = keys, values
        # several forwards may run before the next crop: return only what the mask covers
        visible = min(self.sliding_window - 1 + key_states.shape[-2], keys.shape[-2])
        return keys[..., -visible:, :], values[..., -visible:, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        if self.cumulative_length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, offset
        return self.cumulative_length + query_length, offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` positions and shrink the kept states back to the window
        (`crop(0)` only shrinks). Past the window this needs `activate_past_recording` and a count <= 0."""
        n = _check_crop(tokens_to_remove, type(self).__name__)
        if self.cumulative_length < self.sliding_window:
            super().crop(n)
            self.cumulative_length = self.keys.shape[-2] if self.is_initialized else 0
            return
        if not self.record_past:
            raise RuntimeError("DynamicSlidingWindowLayer.crop: the window is full and the evicted positions were not "
                               "kept; call activate_past_recording() before the updates to be able to crop")
        if n > 0:
            raise ValueError(f"DynamicSlidingWindowLayer.crop(tokens_to_remove={n}): once the window is full, pass a "
                             "negative count of positions to remove")
        drop, kept = -n, self.sliding_window - 1
        end = self.keys.shape[-2] - drop
        start = max(end - kept, 0)
        end = max(end, 0)
        self.keys, self.values = self.keys[..., start:end, :], self.values[..., start:end, :]
        self.cumulative_length = max(self.cumulative_length - drop, 0)


class DynamicIndexedLayer(DynamicLayer):
    """A dynamic layer with an extra indexer key cache (B, T, D) for dynamic sparse attention models."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.indexer_keys: torch.Tensor | None = None
        self.indexer_position_ids: torch.Tensor | None = None
        self.is_indexer_initialized = False

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        """Append (B, T, D) indexer keys; return all of them."""
        if not self.is_indexer_initialized:
            s = indexer_key_states
            self.indexer_keys = s.new_empty(s.shape[0], 0, *s.shape[2:])
            self.is_indexer_initialized = True
        self.indexer_keys = torch.cat([self.indexer_keys, indexer_key_states], dim=1)
        return self.indexer_keys

    def reset(self) -> None:
        super().reset()
        self.indexer_keys = self.indexer_position_ids = None
        self.is_indexer_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        n = _check_crop(tokens_to_remove, type(self).__name__)
        super().crop(n)
        if n == 0:
            return
        if self.indexer_position_ids is not None:
            length = self.indexer_position_ids.shape[-1]
            keep = max(length + n, 0) if n < 0 else min(length, n)
            self.indexer_position_ids = self.indexer_position_ids[..., :keep]
        if self.is_indexer_initialized:
            length = self.indexer_keys.shape[1]
            keep = max(length + n, 0) if n < 0 else min(length, n)
            self.indexer_keys = self.indexer_keys[:, :keep, :]

    def reorder_cache(self, beam_idx) -> None:
        super().reorder_cache(beam_idx)
        if self.is_indexer_initialized:
            self.indexer_keys = self.indexer_keys.index_select(0, beam_idx.to(self.indexer_keys.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.is_indexer_initialized:
            self.indexer_keys = self.indexer_keys.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices) -> None:
        super().batch_select_indices(indices)
        if self.is_indexer_initialized:
            self.indexer_keys = self.indexer_keys[indices, ...]


class StaticLayer(CacheLayerMixin):
    """A preallocated layer of `max_cache_len` positions (allocated on the first update, or by the cache's
    `early_initialization`); `update` writes in place and returns the whole buffers."""

    is_compileable = True
    is_croppable = True

    def __init__(self, max_cache_len: int, **kwargs) -> None:
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"{type(self).__name__}(max_cache_len={max_cache_len!r}) must be a positive int")
        super().__init__()
        self.max_cache_len = max_cache_len
        self.cumulative_length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(self.batch_size, self.num_heads, self.max_cache_len, key_states.shape[-1])
        self.values = value_states.new_zeros(self.batch_size, self.num_heads, self.max_cache_len,
                                             value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, new = self.cumulative_length, key_states.shape[-2]
        if start + new > self.max_cache_len:
            raise CacheOverflowError(f"StaticCache is full: position {start + new - 1} does not fit in "
                                     f"max_cache_len={self.max_cache_len}; create the cache with a larger "
                                     "max_cache_len")
        self.keys[..., start:start + new, :] = key_states
        self.values[..., start:start + new, :] = value_states
        self.cumulative_length = start + new
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def reorder_cache(self, beam_idx) -> None:
        if self.is_initialized:
            self.keys.copy_(self.keys.index_select(0, beam_idx.to(self.keys.device)))
            self.values.copy_(self.values.index_select(0, beam_idx.to(self.values.device)))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (the next update overwrites them)."""
        n = _check_crop(tokens_to_remove, type(self).__name__)
        if n > 0:
            raise ValueError(f"{type(self).__name__}.crop(tokens_to_remove={n}): a static layer is cropped by a "
                             "negative count of positions to remove")
        self.cumulative_length = max(self.cumulative_length + n, 0)


class StaticSlidingWindowLayer(StaticLayer):
    """A preallocated sliding-window (or chunked) layer of min(max_cache_len, sliding_window) positions: once full,
    each update drops the oldest positions. `update` returns what the new tokens attend to: the buffer, or the kept
    positions followed by the new ones when they do not fit."""

    is_sliding = True

    def __init__(self, max_cache_len: int, sliding_window: int, **kwargs) -> None:
        if not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"StaticSlidingWindowLayer(sliding_window={sliding_window!r}): the window must be a "
                             "positive int (the config's sliding_window or attention_chunk_size)")
        super().__init__(max_cache_len=min(max_cache_len, sliding_window))
        # crop can only restore what was never evicted
        self.is_croppable = max_cache_len <= sliding_window

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        size, seen, new = self.max_cache_len, self.cumulative_length, key_states.shape[-2]
        self.cumulative_length = seen + new
        if seen + new <= size:
            self.keys[..., seen:seen + new, :] = key_states
            self.values[..., seen:seen + new, :] = value_states
            return self.keys, self.values
        # what these tokens attend to: the kept positions (all but the oldest once full), then themselves
        kept = slice(1, size) if seen >= size else slice(0, seen)
        keys = torch.cat([self.keys[..., kept, :], key_states], dim=-2)
        values = torch.cat([self.values[..., kept, :], value_states], dim=-2)
        self.keys.copy_(keys[..., -size:, :])
        self.values.copy_(values[..., -size:, :])
        if seen >= size and new == 1:
            return self.keys, self.values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        window, seen = self.max_cache_len, self.cumulative_length
        offset = max(seen - window + 1, 0)
        if seen >= window:
            return window + query_length - 1, offset
        return (seen + query_length if seen + query_length > window else window), offset

    def get_seq_length(self) -> int:
        return self.cumulative_length


class LinearAttentionLayer:
    """A linear-attention (or convolution) layer's state: `number_of_states` conv states (B, C, kernel) and
    recurrent states, no keys/values. `update_conv_state` returns the conv input the causal convolution reads (the
    kept states followed by the new ones); `activate_past_recording` keeps every conv state until the next `crop`."""

    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, number_of_states: int = 1, **kwargs) -> None:
        if not isinstance(number_of_states, int) or number_of_states < 1:
            raise ValueError(f"{type(self).__name__}(number_of_states={number_of_states!r}) must be a positive int")
        self.number_of_states = number_of_states
        states = range(number_of_states)
        self.conv_states: dict[int, torch.Tensor | None] = dict.fromkeys(states)
        self.recurrent_states: dict[int, torch.Tensor | None] = dict.fromkeys(states)
        self.is_conv_states_initialized = dict.fromkeys(states, False)
        self.is_recurrent_states_initialized = dict.fromkeys(states, False)
        self.has_previous_state = dict.fromkeys(states, False)
        self.conv_kernel_size: dict[int, int | None] = dict.fromkeys(states)
        self.cumulative_length_linear = 0
        self.device = self.dtype = None
        self.record_past = False

    def __repr__(self) -> str:
        return type(self).__name__

    @property
    def is_compileable(self) -> bool:
        return not self.record_past  # recorded conv states grow

    def _check_state(self, state_idx: int) -> None:
        if state_idx not in self.conv_states:
            raise IndexError(f"{type(self).__name__}: state_idx={state_idx} is out of range for "
                             f"number_of_states={self.number_of_states}")

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None,
                          **kwargs) -> torch.Tensor:
        """Store conv states (B, C, T) for `state_idx`; return what the causal convolution reads."""
        self._check_state(state_idx)
        if not self.is_conv_states_initialized[state_idx]:
            self.device, self.dtype = conv_states.device, conv_states.dtype
            kernel = conv_states.shape[-1] if conv_kernel_size is None else conv_kernel_size
            self.conv_kernel_size[state_idx] = kernel
            self.conv_states[state_idx] = conv_states.new_zeros(*conv_states.shape[:-1], kernel)
            self.is_conv_states_initialized[state_idx] = True
        if state_idx == 0:
            self.cumulative_length_linear += conv_states.shape[-1]
        kernel = self.conv_kernel_size[state_idx]
        if not self.has_previous_state[state_idx]:  # the prefill: left-pad a short one to the kernel
            full = conv_states
            self.has_previous_state[state_idx] = True
            if not self.record_past and full.shape[-1] < kernel:
                full = torch.nn.functional.pad(full, (kernel - full.shape[-1], 0))
        else:
            full = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
        if self.record_past:
            self.conv_states[state_idx] = full
        else:
            self.conv_states[state_idx].copy_(full[..., -kernel:])
        return full

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs) -> torch.Tensor:
        """Store the last recurrent state (a tensor, or a list of the states after each token, the last one kept);
        while recording the past, the earlier ones are kept for `crop`."""
        self._check_state(state_idx)
        history, last = ([], recurrent_states) if isinstance(recurrent_states, torch.Tensor) \
            else (list(recurrent_states[:-1]), recurrent_states[-1])
        if not self.is_recurrent_states_initialized[state_idx]:
            self.recurrent_states[state_idx] = torch.zeros_like(last)
            self.is_recurrent_states_initialized[state_idx] = True
        if self.record_past:
            self.recurrent_states_history[state_idx].extend([self.recurrent_states[state_idx].clone(), *history])
        self.recurrent_states[state_idx].copy_(last)
        return self.recurrent_states[state_idx]

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        self.record_past = True
        self.recurrent_states_to_keep = recurrent_states_to_keep
        self.recurrent_states_history = {i: [] for i in range(self.number_of_states)}

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the last `-tokens_to_remove` tokens and shrink the conv states back to the kernel size
        (`crop(0)` only shrinks). Needs `activate_past_recording` before the updates."""
        n = _check_crop(tokens_to_remove, type(self).__name__)
        if not self.record_past:
            raise RuntimeError(f"{type(self).__name__}.crop: this layer did not keep its past states; call "
                               "activate_past_recording() before the updates to be able to crop")
        if n > 0:
            raise ValueError(f"{type(self).__name__}.crop(tokens_to_remove={n}): a linear-attention layer is cropped "
                             "by a negative count of positions to remove")
        drop = -n
        self.cumulative_length_linear = max(self.cumulative_length_linear - drop, 0)
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                states, kernel = self.conv_states[i], self.conv_kernel_size[i]
                end = max(states.shape[-1] - drop, 0)
                self.conv_states[i] = states[..., max(end - kernel, 0):end]
            if self.is_recurrent_states_initialized[i]:
                if drop:
                    history = self.recurrent_states_history[i]
                    if drop > len(history):
                        raise ValueError(f"{type(self).__name__}.crop(tokens_to_remove={n}): only {len(history)} "
                                         "recurrent states were recorded since the last crop")
                    self.recurrent_states[i] = history[-drop]
                self.recurrent_states_history[i] = []

    def get_max_length(self) -> int:
        return -1

    def get_seq_length(self) -> int:
        return self.cumulative_length_linear

    def increase_count(self, state_idx: int) -> None:
        """Count a token whose conv state the model updated in place."""
        if state_idx == 0:
            self.cumulative_length_linear += 1

    def reset(self) -> None:
        self.cumulative_length_linear = 0
        for i in range(self.number_of_states):
            for initialised, states in ((self.is_conv_states_initialized, self.conv_states),
                                        (self.is_recurrent_states_initialized, self.recurrent_states)):
                if initialised[i]:
                    states[i].zero_()
            self.has_previous_state[i] = False

    def reorder_cache(self, beam_idx) -> None:
        for i in range(self.number_of_states):
            for initialised, states in ((self.is_conv_states_initialized, self.conv_states),
                                        (self.is_recurrent_states_initialized, self.recurrent_states)):
                if initialised[i]:
                    states[i] = states[i].index_select(0, beam_idx.to(states[i].device))


class LinearAttentionAndFullAttentionLayer(LinearAttentionLayer, DynamicLayer):
    """A layer with both linear-attention states and a dynamic full-attention key/value cache."""

    is_compileable = False

    def __init__(self, number_of_states: int = 1, **kwargs) -> None:
        DynamicLayer.__init__(self)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def crop(self, tokens_to_remove: int) -> None:
        LinearAttentionLayer.crop(self, tokens_to_remove)
        DynamicLayer.crop(self, tokens_to_remove)

    def get_seq_length(self) -> int:
        return DynamicLayer.get_seq_length(self)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        DynamicLayer.reset(self)

    def reorder_cache(self, beam_idx) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        DynamicLayer.reorder_cache(self, beam_idx)


class LinearAttentionAndSlidingWindowAttentionLayer(LinearAttentionLayer, DynamicSlidingWindowLayer):
    """A layer with both linear-attention states and a dynamic sliding-window key/value cache."""

    is_compileable = False
    is_sliding = True

    def __init__(self, sliding_window: int, number_of_states: int = 1, **kwargs) -> None:
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        LinearAttentionLayer.activate_past_recording(self, recurrent_states_to_keep)  # sets record_past for both

    def crop(self, tokens_to_remove: int) -> None:
        LinearAttentionLayer.crop(self, tokens_to_remove)
        DynamicSlidingWindowLayer.crop(self, tokens_to_remove)

    def get_seq_length(self) -> int:
        return DynamicSlidingWindowLayer.get_seq_length(self)

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        DynamicSlidingWindowLayer.reset(self)

    def reorder_cache(self, beam_idx) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        DynamicSlidingWindowLayer.reorder_cache(self, beam_idx)


class DummyLayer:
    """A layer that stores nothing: layers without attention, or ones that read another layer's cache."""

    supports_early_init = False
    is_compileable = is_croppable = True
    is_sliding = False
    is_initialized = True
    keys = values = None

    def __init__(self, **kwargs) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states is None and value_states is None:
            return None, None
        raise NotImplementedError("DummyLayer stores no keys/values: this layer reads another layer's cache (or "
                                  "has no attention), so it cannot be updated")

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None: ...
    def crop(self, tokens_to_remove: int) -> None: ...
    def reorder_cache(self, beam_idx) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices) -> None: ...


DYNAMIC_LAYER_TYPES = {
    "full_attention": DynamicLayer, "sliding_attention": DynamicSlidingWindowLayer,
    "chunked_attention": DynamicSlidingWindowLayer, "indexed_attention": DynamicIndexedLayer,
    "conv": LinearAttentionLayer, "linear_attention": LinearAttentionLayer,
    "hybrid": LinearAttentionAndFullAttentionLayer, "hybrid_sliding": LinearAttentionAndSlidingWindowAttentionLayer,
    "dummy": DummyLayer,
}
# linear-attention states have fixed shapes already, so static caches use them as they are
STATIC_LAYER_TYPES = {
    "full_attention": StaticLayer, "sliding_attention": StaticSlidingWindowLayer,
    "chunked_attention": StaticSlidingWindowLayer, "conv": LinearAttentionLayer,
    "linear_attention": LinearAttentionLayer, "dummy": DummyLayer,
}


def layer_types_and_kwargs(config) -> tuple[list[str], list[dict]]:
    """The cache layer kind of each of `config`'s layers (its `layer_types`, else from `sliding_window` /
    `attention_chunk_size`) and the keyword arguments each layer class takes."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = ("sliding_attention" if getattr(config, "sliding_window", None) is not None
                else "chunked_attention" if getattr(config, "attention_chunk_size", None) is not None
                else "full_attention")
        types = [kind] * n
    types = ["dummy" if t in ("moe", "mlp") else t for t in types]
    sharing = getattr(config, "kv_sharing_modes", None)
    if sharing is not None:
        types = ["dummy" if mode == "reuse" else t for t, mode in zip(types, sharing)]
    kwargs = []
    for t in types:
        k = {}
        if t in ("sliding_attention", "hybrid_sliding"):
            k["sliding_window"] = _window(config, "sliding_window", t)
        elif t == "chunked_attention":
            k["sliding_window"] = _window(config, "attention_chunk_size", t)
        if t in ("conv", "linear_attention", "hybrid", "hybrid_sliding"):
            k["number_of_states"] = getattr(config, "number_of_conv_states", 1)
        kwargs.append(k)
    return list(types), kwargs


def _window(config, field: str, layer_type: str) -> int:
    value = getattr(config, field, None)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"config layer_types lists {layer_type!r} layers but config.{field}={value!r}; set "
                         f"{field} to the window length (a positive int)")
    return value
