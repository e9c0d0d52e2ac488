"""loom's decoders under torch's tracers: torch.jit.trace, FakeTensorMode, the meta device and torch.export, each
compared with the eager forward wherever there are values to compare."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import loom
from loom.models.rope import RotaryEmbedding
from loomtest import TINY

FAMILIES = {"llama": (loom.LlamaConfig, loom.LlamaForCausalLM), "gpt2": (loom.GPT2Config, loom.GPT2LMHeadModel)}
VOCAB = TINY["llama"]["vocab_size"]


def _config(name):
    return FAMILIES[name][0](**TINY[name])


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    torch.manual_seed(0)
    return request.param, FAMILIES[request.param][1](_config(request.param)).eval()


def _ids(seed: int, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


class Logits(nn.Module):
    """What a user traces: the forward reduced to its logits tensor (jit.trace outputs tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).logits


def test_jit_trace_matches_eager(family):
    _, model = family
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # head counts read as ints: fixed per model
        traced = torch.jit.trace(Logits(model), (_ids(1),))
        other = _ids(2)  # not the example input: the trace must not have baked in its values
        torch.testing.assert_close(traced(other), _logits(model, other))


def test_fake_tensor_forward(family):
    name, model = family
    with FakeTensorMode():  # a model built under the mode: every parameter and buffer is fake
        fake_model = FAMILIES[name][1](_config(name)).eval()
        out = _logits(fake_model, _ids(3))
    assert isinstance(out, FakeTensor) and out.shape == (2, 7, VOCAB) and out.dtype == torch.float32
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # a real model on fake inputs
        out = _logits(model, mode.from_tensor(_ids(3)))
    assert isinstance(out, FakeTensor) and out.shape == (2, 7, VOCAB)


def test_meta_model_forward(family):
    name, _ = family
    with torch.device("meta"):
        model = FAMILIES[name][1](_config(name)).eval()
    out = _logits(model, _ids(4).to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 7, VOCAB)


def test_rotary_follows_the_positions_device():
    rotary = RotaryEmbedding(_config("llama"), head_dim=8)  # inv_freq on CPU, as after a meta-device build
    cos, sin = rotary(torch.arange(5, device="meta")[None], torch.float32)
    assert cos.device.type == sin.device.type == "meta" and cos.shape == (1, 1, 5, 8)


def test_export_matches_eager(family):
    _, model = family
    seq = torch.export.Dim("seq", min=2, max=32)
    with torch.no_grad():
        program = torch.export.export(model, (_ids(5),), kwargs={"use_cache": False},
                                      dynamic_shapes=({1: seq}, None))
        exported = program.module()
        for length in (7, 12):  # one graph for any sequence length
            ids = _ids(6, length=length)
            out = exported(ids, use_cache=False)
            assert isinstance(out, loom.ModelOutput) and list(out) == ["logits"]
            torch.testing.assert_close(out.logits, _logits(model, ids))


def test_model_output_is_a_pytree():
    out = loom.ModelOutput(loss=torch.tensor(1.0), logits=torch.ones(2), hidden_states=None)
    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == 2
    back = pytree.tree_unflatten([leaf * 2 for leaf in leaves], spec)
    assert type(back) is loom.ModelOutput and list(back) == ["loss", "logits"] and float(back.loss) == 2.0


class MatmulRecorder(TorchDispatchMode):
    """Counts the matrix products that reach torch's dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                   torch.ops.loom.dense_linear):
            self.products += 1
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_every_matmul(family):
    """A dispatch mode (a FLOP counter, FakeTensorMode) sees every product: torch's matmuls, and the decode-sized
    ones that go to loom's kernels as the operator loom::dense_linear (once opaque ctypes calls no mode could see)."""
    _, model = family
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    with torch.no_grad(), MatmulRecorder() as recorder:
        out = model(_ids(7, batch=1, length=1), use_cache=False).logits
    assert recorder.products >= linears
    torch.testing.assert_close(out, _logits(model, _ids(7, batch=1, length=1)))


def test_jit_trace_of_a_padded_encoder_keeps_the_padding_of_each_call():
    """An encoder's padded batch reads its key counts back to the host in eager mode (loom::flash_attention with key
    counts); a trace must not bake in that the example's padding had that form: traced on right padding, run on left
    padding, equal to eager."""
    torch.manual_seed(0)
    model = loom.BertModel(loom.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64)).eval()

    class Hidden(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    first, other = torch.ones_like(ids), torch.ones_like(ids)
    first[1, 6:] = 0
    other[0, :3] = 0  # left padding: no key counts describe it
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(Hidden(model), (ids, first))
        torch.testing.assert_close(traced(ids, other), Hidden(model)(ids, other), rtol=1e-5, atol=1e-5)
