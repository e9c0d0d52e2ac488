"""loom.models.common.linear: the skinny-input inference kernel equals nn.Linear, and everything it must not take
(hooks, Linear subclasses, other dtypes) still goes through the module's own call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common import SKINNY_MAX_ROWS, linear


def _linear(bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(48, 40, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 48), (3, 5, 48), (8, 1, 48), (1, SKINNY_MAX_ROWS + 3, 48)])
def test_matches_f_linear(bias, shape):
    module = _linear(bias)
    x = torch.randn(shape)
    with torch.no_grad():
        got = linear(module, x)
        want = F.linear(x, module.weight, module.bias)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _Counting(nn.Linear):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_module_call_kept_where_the_fast_path_does_not_apply():
    x = torch.randn(4, 48)
    sub = _Counting(48, 40)  # quantized Linears are subclasses: their forward must run
    with torch.no_grad():
        linear(sub, x)
    assert _Counting.calls == 1

    module = _linear(True)
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        linear(module, x)
    handle.remove()
    assert seen == [torch.Size([4, 40])]


def test_other_dtypes_use_the_module():
    module = _linear(True).to(torch.bfloat16)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(linear(module, x), module(x))
