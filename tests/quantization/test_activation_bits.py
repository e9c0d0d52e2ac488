"""`loom.quantization.set_activation_bits`: a loaded model's int4 Linears switched to 8-bit activations (int8 per
block of 32, loom::int4_linear_a8) at decode sizes and back; prefill and the default path unchanged; the switch is
never saved; the same bits with the kernels off; sensible greedy tokens; refusals that name the argument."""
from __future__ import annotations

import json

import pytest
import torch
from loomtest import kernels_off_for, reference_checkpoint

import loom
from loom.kernels import ops
from loom.quantization import WeightOnlyConfig, activation_bits, set_activation_bits
from loom.quantization.linear import Int4Linear

IDS = torch.tensor([[1, 5, 9, 22, 40, 3, 77, 12]])
BLOCKS = dict(intermediate_size=64, tie_word_embeddings=False)  # every Linear's inputs a multiple of 32


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM", **BLOCKS)[0]


def _int4(folder, **kw):
    cfg = WeightOnlyConfig(bits=4, group_size=32, skip_output_embeddings=False, **kw)
    return loom.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _layers(model):
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


@pytest.mark.parametrize("symmetric", [False, True])
def test_switch_on_runs_every_int4_layer_on_the_8_bit_operator_and_back(llama_dir, symmetric):
    model = _int4(llama_dir, symmetric=symmetric)
    before = _logits(model)
    count = len(_layers(model))
    assert count == 2 * 7 + 1 and activation_bits(model) == {16}
    assert set_activation_bits(model, 8) == count and activation_bits(model) == {8}
    assert "activation_bits=8" in repr(model.lm_head)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        want = ops.int4_linear_a8(x, layer.weight, layer.weight_scale, layer.zero_point, 32) + layer.bias \
            if layer.bias is not None else ops.int4_linear_a8(x, layer.weight, layer.weight_scale,
                                                                 layer.zero_point, 32)
        assert torch.equal(layer(x), want)
    after = _logits(model)
    assert not torch.equal(after, before)  # the 8-bit path did run
    # int8 activations per block of 32 move the tiny model's logits by a fraction of a percent of their range
    assert (after - before).abs().max() <= 0.02 * before.abs().max()
    assert set_activation_bits(model, 16) == count and activation_bits(model) == {16}
    assert torch.equal(_logits(model), before)  # back to the default bits exactly


def test_prefill_longer_than_16_tokens_keeps_int16_activations(llama_dir):
    model = _int4(llama_dir)
    ids = torch.arange(1, 21)[None]  # 20 rows: the int16 blocked GEMM
    before = _logits(model, ids)
    set_activation_bits(model, 8)
    assert torch.equal(_logits(model, ids), before)


def test_same_bits_with_the_kernels_off(llama_dir, monkeypatch):
    model = _int4(llama_dir)
    set_activation_bits(model, 8)
    x = torch.randn(2, 64)
    layers = _layers(model)
    with torch.no_grad():
        on = [m(x[:, :m.in_features]) for m in layers]
        kernels_off_for(monkeypatch)
        off = [m(x[:, :m.in_features]) for m in layers]
    for a, b in zip(on, off):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_greedy_tokens_are_sensible(llama_dir):
    model = _int4(llama_dir)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        base = model.generate(IDS, **kw)
        set_activation_bits(model, 8)
        out = model.generate(IDS, **kw)
        assert out.shape == base.shape and torch.equal(out[:, :8], IDS)
        assert int(out.min()) >= 0 and int(out.max()) < model.config.vocab_size
        # the first new tokens are the int16 model's, and each token is the argmax of the 8-bit model's own full
        # forward over the sequence (16 rows: the 8-bit path too)
        assert torch.equal(out[:, 8:12], base[:, 8:12])
        full = model(out).logits
        assert torch.equal(full[0, 7:-1].argmax(-1), out[0, 8:])


def test_gradient_to_the_input_with_8_bit_activations(llama_dir):
    model = _int4(llama_dir)
    set_activation_bits(model, 8)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    w = ops.int4_dequantize_reference(layer.weight, layer.weight_scale, layer.zero_point)
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1))


def test_the_switch_is_not_saved(llama_dir, tmp_path):
    model = _int4(llama_dir)
    before = _logits(model)
    set_activation_bits(model, 8)
    keys = set(model.state_dict())
    model.save_pretrained(tmp_path / "a8")
    plain = _int4(llama_dir)
    plain.save_pretrained(tmp_path / "a16")
    assert keys == set(plain.state_dict())
    # the same files as the model never switched: nothing about activations in the config or the tensors
    assert json.loads((tmp_path / "a8" / "config.json").read_text()) == \
        json.loads((tmp_path / "a16" / "config.json").read_text())
    assert (tmp_path / "a8" / "model.safetensors").read_bytes() == (tmp_path / "a16" / "model.safetensors").read_bytes()
    again = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "a8")
    assert activation_bits(again) == {16}
    assert torch.equal(_logits(again), before)


def test_gguf_q4_0_model_switches(tmp_path_factory):
    pytest.importorskip("gguf", reason="writes a GGUF file with the gguf package")
    from ggufwrite import write_gguf

    folder, ref = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM", **BLOCKS)
    write_gguf(folder / "tiny-Q4_0.gguf", ref, "llama", "Q4_0")
    model = loom.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny-Q4_0.gguf")
    before = _logits(model)
    assert set_activation_bits(model, 8) == len(_layers(model)) > 0
    after = _logits(model)
    assert not torch.equal(after, before) and (after - before).abs().max() <= 0.02 * before.abs().max()


def test_refusals_name_the_argument(llama_dir):
    model = _int4(llama_dir)
    for bits in (4, 32, True, "8"):
        with pytest.raises(ValueError, match=r"set_activation_bits: bits=.* is not supported; use 8 .* or 16"):
            set_activation_bits(model, bits)
    assert activation_bits(model) == {16}
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        set_activation_bits({}, 8)
    float_model = loom.AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match=r"model \(LlamaForCausalLM\) has no int4 Linear layers"):
        set_activation_bits(float_model, 8)
    int8 = loom.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=WeightOnlyConfig(bits=8))
    with pytest.raises(ValueError, match="no int4 Linear layers"):
        set_activation_bits(int8, 8)
    group16 = loom.AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=WeightOnlyConfig(bits=4, group_size=16))
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' has group_size=16 .* multiple "
                                         r"of 32"):
        set_activation_bits(group16, 8)
    assert activation_bits(group16) == {16}  # nothing switched
    assert set_activation_bits(group16, 16) > 0


def test_the_kernel_layout_is_kept_while_used_remade_when_the_weights_change_and_freed_when_not(llama_dir):
    model = _int4(llama_dir)
    layer = model.model.layers[1].mlp.up_proj
    assert layer._a8 is None
    set_activation_bits(model, 8)
    tiles = layer._a8
    assert tiles is not None and tiles.numel() == layer.weight.numel() + layer.weight_scale.numel() * 2 * 2
    # every layer's layout in one buffer (backed by huge pages where Linux allows)
    assert len({m._a8.untyped_storage().data_ptr() for m in _layers(model)}) == 1
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        y = layer(x)
        assert layer._a8 is tiles  # reused
        with torch.inference_mode():
            layer.weight[0] = 0x77  # changed in place: every weight of row 0 dequantizes to -1 * scale
        changed = layer(x)
    assert layer._a8 is not tiles and not torch.equal(changed[:, 0], y[:, 0]) and torch.equal(changed[:, 1:], y[:, 1:])
    want = ops.int4_linear_a8(x, layer.weight, layer.weight_scale, layer.zero_point, 32)
    assert torch.equal(changed, want + layer.bias if layer.bias is not None else want)
    model.float()  # _apply: the layout is dropped and remade on the next call
    assert layer._a8 is None
    set_activation_bits(model, 16)
    # back at 16 bits the default decode kernel reads the same tiles where this kernel level has it (AVX-512),
    # so they stay (remade, one buffer); elsewhere they are freed
    if ops.int4_tiles_int16():
        assert all(m.tiles_current() and m.wants_tiles() for m in _layers(model))
        assert len({m._a8.untyped_storage().data_ptr() for m in _layers(model)}) == 1
    else:
        assert all(m._a8 is None for m in _layers(model))
    for m in _layers(model):
        m.tiles_for_decode = False
    set_activation_bits(model, 16)
    assert all(m._a8 is None for m in _layers(model))
