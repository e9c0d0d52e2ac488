"""Built-in int8/int4 weight-only quantization: error bounds, kernels, memory, targeting, save/reload, bad input.

Stated per-layer bounds (relative Frobenius error of the layer output against fp32 on Gaussian weights and inputs):
int8 per-channel < 1% (theory for absmax scaling: ~0.75%), int4 group-wise (group 32) < 12% symmetric (theory ~9%),
< 8% asymmetric (the default; measured ~6%). The native C kernels themselves are checked in test_quant_native.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import loom
from loom.kernels import is_plain_linear
from loomtest import reference_checkpoint
from loom.quantization import WeightOnlyConfig, quantize_
from loom.kernels import build
from loom.quantization import kernels
from loom.quantization.linear import (Int4Linear, Int8Linear, dequantized_weight, quantize_int4,
                                     quantize_int4_asymmetric)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")[0]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "gpt2", "GPT2LMHeadModel")[0]


def _linear(inp=256, out=192, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_layer_error_bound_and_kernels_agree(rows):
    lin = _linear()
    q = Int8Linear.from_linear(lin)
    x = torch.randn(rows, 256)
    x[:, :3] *= 30  # activation outliers, as in real models
    with torch.no_grad():
        ref = lin(x)
        fast = q(x)
        exact = nn.functional.linear(x, dequantized_weight(q), lin.bias)
    assert _rel(exact, ref) < 0.01
    assert _rel(fast, ref) < 0.01
    if build.available():
        assert q.kernel == "native"  # weight math exact; x rounded to int16 per row (step max|x| / 32767)
        bound = x.abs().amax(dim=1, keepdim=True) / 65534 * dequantized_weight(q).abs().sum(dim=1)
        assert ((fast - exact).abs() <= bound + 1e-5 * exact.abs() + 1e-5 * exact.abs().max()).all()
    else:
        assert q.kernel == ("fbgemm_int8" if kernels.fbgemm_available() else "dequantize")


@pytest.mark.skipif(not kernels.fbgemm_available(), reason="this torch build has no fbgemm quantized engine")
def test_int8_fbgemm_fallback_stays_accurate(monkeypatch):
    # the fallback on CPUs without the native kernels quantizes activations too; its residual pass keeps it within
    # ~0.3% of the dequantized result even with 30x outliers (a single 7-bit pass is off by 2-8% here)
    monkeypatch.setenv("LOOM_QUANT_KERNEL", "fbgemm_int8")
    lin = _linear()
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 256)
    x[:, :3] *= 30
    with torch.no_grad():
        exact = nn.functional.linear(x, dequantized_weight(q), lin.bias)
        fast = q(x)
    assert q.kernel == "fbgemm_int8"
    assert _rel(fast, exact) < 5e-3


@pytest.mark.parametrize("symmetric,bound", [(True, 0.12), (False, 0.088)])  # measured 0.090, 0.084
def test_int4_layer_error_bound(symmetric, bound):
    lin = _linear()
    q = Int4Linear.from_linear(lin, group_size=32, symmetric=symmetric)
    x = torch.randn(4, 256)
    with torch.no_grad():
        err = _rel(q(x), lin(x))
    assert err < bound
    assert err > 0.01  # 4-bit cannot be this good: guards against silently running the float weights


@pytest.mark.parametrize("group", [16, 32, 64])
def test_asymmetric_int4_zero_points_are_integers_and_beat_symmetric(group):
    """Integer zero points in [0, 15] (what compressed-tensors, GPTQ and AWQ store), and still a closer fit than
    symmetric int4 at the same group size; an all-positive group keeps 0 on its grid (zero point 0)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[0, :group] = w[0, :group].abs() + 0.01
    packed, scale, zero = quantize_int4_asymmetric(w, group)
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == zero.shape == (64, 256 // group)
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 15
    assert zero[0, 0] == 0
    asym = kernels.int4_dequantize(packed, scale, torch.float32, zero)
    sym = kernels.int4_dequantize(*quantize_int4(w, group), torch.float32)
    assert (asym - w).square().sum() < 0.9 * (sym - w).square().sum()  # ~0.8 measured
    # q reproduces from the stored scale and zero point by the format's rounding rule
    q = torch.round(w.reshape(64, -1, group) / scale.float()[..., None] + zero.float()[..., None]).clamp(0, 15)
    assert torch.equal(kernels.unpack_int4(packed), q.reshape(64, 256).to(torch.uint8))


def test_int4_pack_round_trip():
    u = torch.randint(0, 16, (6, 10))
    assert torch.equal(kernels.unpack_int4(kernels.pack_int4(u)), u.to(torch.uint8))


def test_quantized_weight_bytes():
    lin = _linear(1024, 512)
    fp32 = lin.weight.numel() * 4

    def nbytes(m):
        return sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if not k.endswith("bias"))

    assert 0.24 < nbytes(Int8Linear.from_linear(lin)) / fp32 < 0.26
    # asymmetric int4 (the default), float16 scale + zero per 32 weights: 1/8 + 1/32 of fp32 = 1/6.4
    assert 1 / 6.5 < nbytes(Int4Linear.from_linear(lin, 32)) / fp32 < 1 / 6.3
    # symmetric int4 with one float32 scale per 128 weights: 1/8 + 1/128 of fp32 = ~1/7.5
    assert 1 / 8 < nbytes(Int4Linear.from_linear(lin, 128, symmetric=True)) / fp32 < 1 / 7


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=32"):
        Int4Linear(32, 8, group_size=48)


def test_to_device_moves_and_to_dtype_is_refused():
    for q in (Int8Linear.from_linear(_linear()), Int4Linear.from_linear(_linear(), 32)):
        x = torch.randn(2, 256)
        with torch.no_grad():
            before = q(x)
            q.to("cpu")
            assert torch.equal(q(x), before)
        with pytest.raises(TypeError, match="cannot cast a quantized .* to torch.bfloat16"):
            q.to(torch.bfloat16)
        with pytest.raises(TypeError, match="to torch.float16"):
            q.half()


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, None), (4, 16, False), (4, 16, True)])
def test_from_pretrained_quantizes_targets_and_reloads_as_saved(llama_dir, tmp_path, bits, group, symmetric):
    base = loom.LlamaForCausalLM.from_pretrained(llama_dir)
    config = WeightOnlyConfig(bits=bits, group_size=group, symmetric=symmetric)
    model = loom.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    cls = Int8Linear if bits == 8 else Int4Linear
    layer = model.model.layers[0]
    for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(m, cls)
    assert is_plain_linear(model.lm_head) and model.lm_head.weight.dtype == torch.float32
    assert layer.input_layernorm.weight.dtype == torch.float32
    assert model._loom_quantizer.converted and model.config.quantization_config.bits == bits
    ids = torch.randint(3, 99, (2, 9))
    with torch.no_grad():
        ref, out = base(ids).logits, model(ids).logits
    assert _rel(out, ref) < (0.02 if bits == 8 else 0.15)

    model.save_pretrained(tmp_path)
    import json

    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "compressed-tensors"  # every layout with integer zero points
    assert stored["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert stored["config_groups"]["group_0"]["weights"]["symmetric"] is (symmetric is not False)
    assert ("model.layers.0.mlp.up_proj.weight_zero" in model.state_dict()) == (symmetric is False)
    again = loom.LlamaForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.model.layers[1].mlp.up_proj, cls)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


def test_bf16_compute_dtype(llama_dir):
    model = loom.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16,
                                                  quantization_config=WeightOnlyConfig(bits=8))
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight_scale.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.randint(3, 99, (1, 5))).logits.dtype == torch.bfloat16


def test_modules_to_not_convert_and_skip_output_embeddings(llama_dir):
    # the reference's matching: a prefix up to a module boundary, a regex, or a suffix
    cfg = WeightOnlyConfig(bits=8, modules_to_not_convert=["mlp.up_proj", "layers.1.self_attn.q_proj",
                                                           r"model\.layers\.0\.mlp\.(gate|down)_proj"])
    model = loom.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    assert is_plain_linear(model.model.layers[0].mlp.up_proj)
    assert is_plain_linear(model.model.layers[1].mlp.up_proj)
    assert is_plain_linear(model.model.layers[0].mlp.gate_proj)
    assert isinstance(model.model.layers[1].mlp.gate_proj, Int8Linear)
    assert is_plain_linear(model.model.layers[1].self_attn.q_proj)
    assert isinstance(model.model.layers[1].self_attn.k_proj, Int8Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)
    head = loom.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=WeightOnlyConfig(
        bits=8, skip_output_embeddings=False))
    assert isinstance(head.lm_head, Int8Linear)


def test_quantize_loaded_model_matches_quantize_on_load_and_refuses_twice(llama_dir):
    loaded = loom.LlamaForCausalLM.from_pretrained(llama_dir)
    on_load = loom.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=WeightOnlyConfig(bits=4,
                                                                                                    group_size=16))
    quantize_(loaded, WeightOnlyConfig(bits=4, group_size=16))
    assert set(loaded.state_dict()) == set(on_load.state_dict())
    for name, t in on_load.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    with pytest.raises(ValueError, match="quantize_: the model is already quantized"):
        quantize_(loaded, WeightOnlyConfig(bits=8))


def test_group_size_error_at_load_names_the_argument(llama_dir):
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=32"):
        loom.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=WeightOnlyConfig(bits=4, group_size=64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e7])
def test_int4_load_names_the_tensor_int4_cannot_store(llama_dir, tmp_path, bad):
    model = loom.LlamaForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 20] = bad
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: loom::int4_quantize_asymmetric: "
                                         r"weight row 3, columns 16-31 (hold NaN or inf|span .* too wide)"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=WeightOnlyConfig(bits=4, group_size=16))


@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.15)])
def test_gpt2_transposed_weights_round_trip(gpt2_dir, tmp_path, bits, bound):
    base = loom.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    model = loom.GPT2LMHeadModel.from_pretrained(gpt2_dir, quantization_config=WeightOnlyConfig(bits=bits))
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8Linear if bits == 8 else Int4Linear)
    ids = torch.randint(3, 99, (2, 8))
    with torch.no_grad():
        out = model(ids).logits
        assert _rel(out, base(ids).logits) < bound
    model.save_pretrained(tmp_path)
    again = loom.GPT2LMHeadModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


def test_minilm_embeddings_close_to_fp32(minilm_dir):
    base = loom.AutoModel.from_pretrained(minilm_dir)
    ids = torch.randint(1000, 20000, (3, 16))
    with torch.no_grad():
        ref = base(ids).last_hidden_state.mean(1)
        # random token ids are harsher than text: default int4 (asymmetric, group 32) measures 0.965-0.975 here and
        # 0.978 mean on the benchmark's real sentences (the 0.97 target)
        for cfg, floor in ((WeightOnlyConfig(bits=8), 0.998), (WeightOnlyConfig(bits=4), 0.96)):
            q = loom.AutoModel.from_pretrained(minilm_dir, quantization_config=cfg)
            cos = nn.functional.cosine_similarity(q(ids).last_hidden_state.mean(1), ref)
            assert cos.min() > floor, (cfg, cos)


def test_int8_weight_stays_readable_and_packing_follows_changes(monkeypatch):
    """On CPUs without loom's kernels the int8 Linear runs on fbgemm's packed copy; its `weight` stays the int8 tensor
    (peft reads it when wrapping) and an in-place change to it is seen by the next forward."""
    from loomtest import kernels_off_for

    from loom.quantization.linear import Int8Linear

    kernels_off_for(monkeypatch)
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 32)).eval()
    layer.choose_kernel()
    x = torch.randn(3, 64)
    before = layer(x)
    assert layer.weight is not None and layer.weight.dtype == torch.int8
    with torch.no_grad():
        layer.weight.mul_(-1)
    assert torch.allclose(layer(x) - layer.bias, -(before - layer.bias), atol=1e-2)
    layer.weight = -layer.weight  # a replaced tensor (not an in-place change) is repacked too
    assert torch.allclose(layer(x), before, atol=1e-2)


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_int8_linear_passes_the_input_gradient(monkeypatch, kernels):
    """Adapters below a quantized layer learn only if the layer passes its input gradient on: it equals the gradient
    through the dequantized weight on every kernel path (fbgemm's product has no backward of its own)."""
    from loomtest import kernels_off_for

    from loom.quantization.linear import Int8Linear

    if kernels == "off":
        kernels_off_for(monkeypatch)
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 32))
    layer.choose_kernel()
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().requires_grad_()
    torch.nn.functional.linear(x2, layer.weight.float() * layer.weight_scale[:, None], layer.bias).square().sum() \
        .backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-3, rtol=1e-3)
