"""ModelOutput against the reference's: dataclass subclasses, building from a dict or pairs, fixed keys, indexing,
pytree registration and pickling."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
import torch.utils._pytree as pytree
import transformers.utils

import loom


def _output_class(base):
    @dataclasses.dataclass
    class Out(base):
        a: float
        b: float | None = None
        c: float | None = None

    return Out


OURS, THEIRS = _output_class(loom.ModelOutput), _output_class(transformers.utils.ModelOutput)


@pytest.mark.parametrize("args,kwargs", [((), {"a": 30}), ((), {"a": 30, "c": 10}), (({"a": 30, "b": 10},), {}),
                                         (([("a", 30), ("c", 10)],), {}), ((), {"a": (30, 30)}),
                                         ((torch.ones(2),), {"b": 2})])
def test_behaves_like_reference(args, kwargs):
    ours, theirs = OURS(*args, **kwargs), THEIRS(*args, **kwargs)
    assert list(ours.keys()) == list(theirs.keys())
    for name in "abc":
        assert (getattr(ours, name) is None) == (getattr(theirs, name) is None)
    assert len(ours.to_tuple()) == len(theirs.to_tuple()) and ours[:] == ours.to_tuple()
    for out in (ours, theirs):
        out.a = 5
        out["b"] = 6
        assert (out.a, out["a"], out.b) == (5, 5, 6)
    assert list(ours.keys()) == list(theirs.keys()) and ours[1] == theirs[1]
    for operation in (lambda o: o.update({"d": 1}), lambda o: o.pop("a"), lambda o: o.setdefault("d", 1),
                      lambda o: o.__delitem__("a")):
        with pytest.raises(Exception):
            operation(theirs)
        with pytest.raises(RuntimeError, match="keys are fixed"):
            operation(ours)


def test_errors_like_reference():
    for cls in (OURS, THEIRS):
        with pytest.raises(ValueError):
            cls([("a", 30), (10, 10)])
        with pytest.raises(AttributeError):
            cls(a=1).d  # noqa: B018
        with pytest.raises(KeyError):
            cls(a=1)["b"]  # noqa: B018

    class NotADataclass(loom.ModelOutput):
        a: float

    with pytest.raises(TypeError, match="not a dataclass"):
        NotADataclass(a=1.0)


def test_pytree_and_pickle():
    out = OURS(a=1.0, c=2.0)
    leaves, spec = pytree.tree_flatten(out)
    assert leaves == [1.0, 2.0] and spec.type is OURS and spec.context == ["a", "c"]
    back = pytree.tree_unflatten(leaves, spec)
    assert type(back) is OURS and back == out and back.c == 2.0
    assert not pytree.tree_is_leaf(loom.ModelOutput({"a": 1.0}))
    for copied in (pickle.loads(pickle.dumps(loom.ModelOutput(logits=torch.ones(1)))), copy.deepcopy(out)):
        assert list(copied.keys()) in (["logits"], ["a", "c"])
    assert copy.deepcopy(out).c == 2.0 and copy.deepcopy(out).b is None
