"""Model outputs: an ordered dict with attribute access and tuple-style indexing, like the reference's ModelOutput."""
from __future__ import annotations

import dataclasses
import functools
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

    Subclasses that declare fields are dataclasses (as the reference requires): `Out(a=1)`, `Out({"a": 1})` and
    `Out([("a", 1)])` all work. Keys are fixed once built: `update`, `pop`, `setdefault` and `del` raise, as in the
    reference; set a field with `out.a = ...` or `out["a"] = ...`.

    Registered as a pytree node (each subclass too), so torch.export, torch.compile's output handling and other
    tree-walking tools see the tensors inside, as they do for the reference's outputs."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register_pytree(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if type(self).__dict__.get("__annotations__") and not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} declares fields but is not a dataclass; decorate it with "
                            "@dataclasses.dataclass, as every ModelOutput subclass with fields must be")
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            if value is not None:
                self[key] = value

    def __post_init__(self) -> None:
        """After a dataclass __init__: the set fields become keys; a lone first argument that is a dict or an
        iterable of (key, value) pairs is read as the fields themselves."""
        fields = dataclasses.fields(self)
        first = getattr(self, fields[0].name)
        others_unset = all(getattr(self, f.name) is None for f in fields[1:])
        pairs = _as_pairs(first) if others_unset and not torch_is_tensor(first) else None
        if pairs is not None:
            OrderedDict.__delitem__(self, fields[0].name) if fields[0].name in self else None
            object.__setattr__(self, fields[0].name, None)
            for key, value in pairs:
                if value is not None:
                    self[key] = value
            return
        for field in fields:
            value = getattr(self, field.name)
            if value is not None:
                OrderedDict.__setitem__(self, field.name, value)

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name in FIELDS:
            return None
        if name == "cache":  # the reference 5.x's name for past_key_values
            return self.get("past_key_values")
        raise AttributeError(f"{type(self).__name__} has no field {name!r}; it has {list(self.keys())}")

    def __setattr__(self, name: str, value: Any) -> None:
        if value is None:
            if name in self:
                OrderedDict.__delitem__(self, name)
        else:
            OrderedDict.__setitem__(self, name, value)
        if dataclasses.is_dataclass(self) and name in {f.name for f in dataclasses.fields(self)}:
            object.__setattr__(self, name, value)

    def __setitem__(self, key, value) -> None:
        OrderedDict.__setitem__(self, key, value)
        if isinstance(key, str) and dataclasses.is_dataclass(self):
            object.__setattr__(self, key, value)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def _frozen(self, *args, **kwargs):
        raise RuntimeError(f"a {type(self).__name__}'s keys are fixed once built (as in the reference): set a field "
                           "with `out.name = value` or `out['name'] = value` instead")

    __delitem__ = setdefault = pop = update = _frozen

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __reduce__(self):
        if not dataclasses.is_dataclass(self):
            return (self.__class__, (dict(self),))
        # a dataclass __init__ needs its required fields positionally; the items are restored after it
        rebuild, _, *rest = super().__reduce__()
        return (rebuild, tuple(getattr(self, f.name) for f in dataclasses.fields(self)), *rest)


def torch_is_tensor(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "dim")


def _as_pairs(value):
    """`value` as a list of (str, value) pairs when it is a dict or an iterable of such pairs, else None."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return None
    try:
        items = list(value)
    except TypeError:
        return None
    if not items or not all(isinstance(i, (list, tuple)) and len(i) == 2 for i in items):
        return None
    if not all(isinstance(k, str) for k, _ in items):
        if isinstance(items[0][0], str):
            raise ValueError(f"cannot build a ModelOutput from {value!r}: every pair must start with a field name")
        return None
    return items


def _flatten(output: ModelOutput):
    return list(output.values()), list(output.keys())


def _flatten_with_keys(output: ModelOutput):
    return [(pytree.MappingKey(k), v) for k, v in output.items()], list(output.keys())


def _unflatten(cls: type, values, keys) -> ModelOutput:
    return cls(**dict(zip(keys, values)))


def _register_pytree(cls: type) -> None:
    pytree.register_pytree_node(cls, _flatten, functools.partial(_unflatten, cls),
                                flatten_with_keys_fn=_flatten_with_keys,
                                serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


_register_pytree(ModelOutput)
