"""Model outputs: an ordered dict with attribute access and tuple-style indexing, like the reference's ModelOutput."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch.utils._pytree as pytree


# Output fields that read as None when a model did not produce them (as the reference's dataclass fields do).
FIELDS = frozenset({"loss", "logits", "last_hidden_state", "pooler_output", "past_key_values", "hidden_states",
                    "attentions", "start_logits", "end_logits", "sequences", "scores", "logits_processed",
                    "sequences_scores", "beam_indices", "image_embeds", "cross_attentions", "aux_loss",
                    "router_logits"})


class ModelOutput(OrderedDict):
    """Fields set to None are left out, so `out[0]` is the first field that has a value (the reference's rule).

    Registered as a pytree node (each subclass too), so torch.export, torch.compile's output handling and other
    tree-walking tools see the tensors inside, as they do for the reference's outputs."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register_pytree(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            if value is not None:
                self[key] = value

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name in FIELDS:
            return None
        raise AttributeError(f"{type(self).__name__} has no field {name!r}; it has {list(self.keys())}")

    def __setattr__(self, name: str, value: Any) -> None:
        if value is None:
            self.pop(name, None)
        else:
            self[name] = value

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __reduce__(self):
        return (self.__class__, (dict(self),))


def _flatten(output: ModelOutput):
    return list(output.values()), (type(output), list(output.keys()))


def _flatten_with_keys(output: ModelOutput):
    return [(pytree.MappingKey(k), v) for k, v in output.items()], (type(output), list(output.keys()))


def _unflatten(values, context) -> ModelOutput:
    cls, keys = context
    return cls(zip(keys, values))


def _register_pytree(cls: type) -> None:
    pytree.register_pytree_node(cls, _flatten, _unflatten, flatten_with_keys_fn=_flatten_with_keys,
                                serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


_register_pytree(ModelOutput)
