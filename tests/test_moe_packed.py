"""The packed mixture-of-experts decode path (loom/models/moe.py, csrc/moe.c): experts packed on first use into
stacked gate_up / down tensors that their parameters become views of, every routed expert of a step in two kernel
calls. Bitwise the module path, token-identical to the reference, invisible to state dicts and saving, repacked
when the weights move, and never taken where a hook, a quantized Linear or kernels-off would be bypassed."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.kernels import build, policy
from loom.kernels.chain import DecodeChain
from loom.models.moe import SparseMoE
from loom.quantization import WeightOnlyConfig
from loomtest import kernels_on, reference_checkpoint

HEADS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# expert widths a multiple of 32, so that torch's activation runs its vector body on the module path's contiguous
# rows and on the packed path's strided halves alike (its scalar tail may round differently in the last bit)
WIDE = {"mixtral": dict(intermediate_size=32), "qwen2_moe": dict(moe_intermediate_size=32),
        "qwen3_moe": dict(moe_intermediate_size=32)}


def _blocks(model) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def _module_path(model):
    """Hooks (that change nothing) on one expert per block: the packed path steps aside for the modules."""
    return [b.experts[0].register_forward_hook(lambda *args: None) for b in _blocks(model)]


@pytest.fixture(scope="module", params=sorted(HEADS))
def family(request, tmp_path_factory):
    model_type = request.param
    path, ref = reference_checkpoint(tmp_path_factory, model_type, HEADS[model_type], pad_token_id=0,
                                     **WIDE[model_type])
    return model_type, path, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_step_is_bitwise_the_module_path(family, dtype):
    _, path, _ = family
    model = loom.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for block in _blocks(model):
        for tokens in (1, 3, 8, 16):
            x = torch.randn(tokens, 1, model.config.hidden_size, generator=g).to(dtype)
            with torch.no_grad():
                packed = block(x)
                hook = block.experts[0].register_forward_hook(lambda *args: None)
                modules = block(x)
                hook.remove()
            assert torch.equal(packed, modules)
        assert (block._packed is not None) == kernels_on()


def test_generate_is_token_identical_to_the_reference_and_the_module_path(family):
    _, path, ref = family
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        for batch, m in ((ids[1:], None), (ids, mask)):
            got = ours.generate(batch, attention_mask=m, **kw).tolist()
            assert got == ref.generate(batch, attention_mask=m, **kw).tolist()
            hooks = _module_path(ours)
            assert got == ours.generate(batch, attention_mask=m, **kw).tolist()
            for h in hooks:
                h.remove()
    # bf16: the packed and module paths give the same tokens (the reference's bf16 products round differently)
    ours = loom.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        got = ours.generate(ids, attention_mask=mask, **kw).tolist()
        hooks = _module_path(ours)
        assert got == ours.generate(ids, attention_mask=mask, **kw).tolist()
        for h in hooks:
            h.remove()


def _decode_once(model):
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7]]), use_cache=True)
        return model(torch.tensor([[8]]), past_key_values=out.past_key_values, use_cache=True).logits


def test_packing_keeps_parameters_state_dict_and_the_reference_round_trip(family, tmp_path):
    import transformers

    model_type, path, ref = family
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    params = dict(ours.named_parameters())
    keys = list(ours.state_dict())
    _decode_once(ours)
    assert dict(ours.named_parameters()) == params and list(ours.state_dict()) == keys  # the same objects, names
    if kernels_on():
        block = _blocks(ours)[0]
        gate_up, down = block._packed[:2]
        gate, up, down_name = block.linear_names
        expert = block.experts[1]
        inter = down.shape[2]
        # the parameters are views of the packed tensors: nothing is held twice
        assert getattr(expert, gate).weight.data_ptr() == gate_up[1, :inter].data_ptr()
        assert getattr(expert, up).weight.data_ptr() == gate_up[1, inter:].data_ptr()
        assert getattr(expert, down_name).weight.data_ptr() == down[1].data_ptr()
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, HEADS[model_type]).from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 99, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_weights_changed_after_packing_are_used(family):
    _, path, _ = family
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    _decode_once(ours)
    block = _blocks(ours)[0]
    gate = block.linear_names[0]
    x = torch.randn(2, 1, ours.config.hidden_size, generator=torch.Generator().manual_seed(3))

    def both():
        with torch.no_grad():
            packed = block(x)
            hook = block.experts[0].register_forward_hook(lambda *args: None)
            modules = block(x)
            hook.remove()
        return packed, modules

    before = both()[0]
    with torch.no_grad():
        for expert in block.experts:  # in place: written through the views into the packed tensors
            getattr(expert, gate).weight.mul_(2.0)
    packed, modules = both()
    assert torch.equal(packed, modules) and not torch.equal(packed, before)
    for expert in block.experts:  # new tensors: packed again
        w = getattr(expert, gate).weight
        w.data = w.data * 0.5
    packed, modules = both()
    assert torch.equal(packed, modules)
    # x 2 x 0.5 is exact; torch's BLAS (kernels off) may round differently for weights at another address
    torch.testing.assert_close(packed, before, rtol=1e-6, atol=1e-8)
    ours.to(torch.bfloat16)  # a new dtype drops the packed copy and packs the bf16 weights on next use
    assert block._packed is None
    with torch.no_grad():
        y = block(x[:1].bfloat16())  # one token: packed at every kernel level
    assert y.dtype == torch.bfloat16 and (block._packed is not None) == kernels_on()
    if kernels_on():
        assert block._packed[0].dtype == torch.bfloat16


def test_share_memory_keeps_the_parameters_shared(family):
    """share_memory() moves the storage the parameters share with the packed tensors: they stay its views (a later
    repack would take them out of shared memory)."""
    _, path, _ = family
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    want = _decode_once(ours)
    ours.share_memory()
    if kernels_on():
        assert torch.equal(_decode_once(ours), want)
    else:  # torch's BLAS may round differently for weights at another address
        torch.testing.assert_close(_decode_once(ours), want, rtol=1e-5, atol=1e-6)
    assert all(p.is_shared() for p in ours.parameters())
    assert all((b._packed is not None) == kernels_on() for b in _blocks(ours))


def test_hooks_quantized_experts_and_training_keep_the_module_path(family):
    _, path, _ = family
    ours = loom.AutoModelForCausalLM.from_pretrained(path)
    calls = []
    hooks = [b.experts[e].register_forward_hook(lambda *args: calls.append(1))
             for b in _blocks(ours) for e in range(len(b.experts))]
    _decode_once(ours)
    for h in hooks:
        h.remove()
    assert len(calls) >= len(_blocks(ours)) * ours.config.num_experts_per_tok  # the modules ran, hooks and all
    assert all(b._packed is None for b in _blocks(ours))
    q = loom.AutoModelForCausalLM.from_pretrained(path, quantization_config=WeightOnlyConfig(bits=8))
    _decode_once(q)
    assert all(b._packed is None for b in _blocks(q))
    ours.train()
    out = ours(torch.tensor([[5, 6]]), labels=torch.tensor([[5, 6]]))
    out.loss.backward()  # gradients reach the experts' own parameters
    assert any(p.grad is not None for b in _blocks(ours) for p in b.experts.parameters())
    assert all(b._packed is None for b in _blocks(ours))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_plan_is_bitwise_the_module_path(family, dtype, monkeypatch):
    """generate through the decode plan (one chain over attention, router, packed experts and Qwen2-MoE's shared
    expert) gives the scores of the experts' own modules, bitwise, at batch 1 and on a left-padded batch."""
    _, path, _ = family
    model = loom.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ids = torch.randint(3, 99, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[2, :2] = 0
    steps = [0]
    run = DecodeChain.run

    def counted(self, *args):
        steps[0] += self.n
        return run(self, *args)
    monkeypatch.setattr(DecodeChain, "run", counted)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
              return_dict_in_generate=True)
    for rows in (1, 3):
        steps[0] = 0
        planned = model.generate(ids[:rows], attention_mask=mask[:rows], **kw)
        ran = steps[0]
        hooks = _module_path(model)
        try:
            modules = model.generate(ids[:rows], attention_mask=mask[:rows], **kw)
        finally:
            for h in hooks:
                h.remove()
        assert planned.sequences.tolist() == modules.sequences.tolist()
        assert all(torch.equal(a, b) for a, b in zip(planned.scores, modules.scores))
        plan = (build.available()
                and (rows == 1 or dtype is torch.float32 or policy.batched_bf16()))
        assert ran == (9 * model.config.num_hidden_layers if plan else 0)
