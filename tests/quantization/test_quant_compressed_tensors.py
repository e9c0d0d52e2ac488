"""compressed-tensors: loom's int8/int4 saves load in the reference with loom's logits; checkpoints written by
compressed-tensors' own compressors load in loom (on its kernels where the layout maps, dequantized otherwise) with
the reference's logits, or, where the reference cannot load them on CPU, with those of a model holding the weights
compressed-tensors' own decompressor produces. Bad input gets errors naming the tensor or field."""
from __future__ import annotations

import json

import pytest
import torch

import loom
from loom.kernels import is_plain_linear
from loom.quantization import WeightOnlyConfig
from loom.quantization.ct_config import CT_VERSION
from loom.quantization.linear import Int4Linear, Int8GroupLinear, Int8Linear, dequantized_weight
from loomtest import quantized_tolerance, reference_checkpoint

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors (dev extra) writes the test checkpoints")
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,  # noqa: E402
                                             QuantizationScheme, apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

IDS = torch.tensor([[5, 17, 33, 2, 64, 8, 91, 40], [7, 7, 12, 80, 3, 55, 21, 9]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _ct_written_config(args: QuantizationArgs, ignore: list[str], tmp_path) -> dict:
    """config.json's quantization_config exactly as compressed-tensors writes it for one weight-only group."""
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="pack-quantized",
                                quantization_status="compressed")
    (tmp_path / "config.json").write_text("{}")
    ModelCompressor(quantization_config=config).update_config(str(tmp_path))
    return json.loads((tmp_path / "config.json").read_text())["quantization_config"]


# -- loom -> compressed-tensors -> reference -----------------------------------------------------------------------
def _reference_load(path, symmetric: bool = True):
    """The reference's model of a compressed-tensors checkpoint. Asymmetric pack-quantized files (compressed-tensors'
    own as well as loom's) only load with dequantize=True: the reference's default compressed path allocates the
    zero points unpacked, (out, groups), and refuses the packed (out / 8, groups) tensors the format stores."""
    import transformers

    kwargs = {} if symmetric else {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 16, True), (4, -1, True), (4, 16, False),
                                                  (4, -1, False)])
def test_loom_save_is_compressed_tensors_the_reference_loads(llama, tmp_path, bits, group, symmetric):
    path, _ = llama
    config = WeightOnlyConfig(bits=bits, group_size=group, symmetric=symmetric)
    model = loom.LlamaForCausalLM.from_pretrained(path, quantization_config=config)
    ours = _logits(model)
    model.save_pretrained(tmp_path / "saved")
    assert model.config.quantization_config == config  # the live model keeps its own config

    stored = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    channel = bits == 8 or group == -1
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel" if channel else "group", group_size=None if channel else group)
    (tmp_path / "ct").mkdir()
    written = _ct_written_config(args, ["lm_head"], tmp_path / "ct")
    # "version" is the writer's own release (loom states the layout it follows; the installed package its version)
    assert stored["version"] == CT_VERSION and written.pop("version")
    assert {k: v for k, v in stored.items() if k != "version"} == written

    ref = _reference_load(tmp_path / "saved", symmetric)
    torch.testing.assert_close(_logits(ref), ours, **quantized_tolerance(model))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):  # decompressed by the forward
        want = dequantized_weight(model.get_submodule(name))
        torch.testing.assert_close(ref.get_submodule(name).weight, want, atol=0, rtol=0)

    again = loom.LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(again.model.layers[1].mlp.up_proj, Int8Linear if bits == 8 else Int4Linear)
    for name, t in model.state_dict().items():  # same layout (float16 scales and zero points when asymmetric)
        assert again.state_dict()[name].dtype == t.dtype and torch.equal(again.state_dict()[name], t), name
    assert torch.equal(_logits(again), ours)
    again.save_pretrained(tmp_path / "twice")  # a loaded compressed-tensors model saves back the same files
    assert json.loads((tmp_path / "twice" / "config.json").read_text())["quantization_config"] == stored


def test_asymmetric_int4_zero_points_are_packed_as_the_format_defines(llama, tmp_path):
    """weight_zero_point holds the signed zero points (nibble zero point - 8) packed 8 to an int32 along the output
    dimension, read back here with compressed-tensors' own unpacker; scales are float32 (the reference computes
    (q - zero_point) * scale in the scale's dtype, so float16 ones would round differently from loom's kernels)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    path, _ = llama
    model = loom.LlamaForCausalLM.from_pretrained(path, quantization_config=WeightOnlyConfig(bits=4, group_size=16))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj"
    module = model.get_submodule(name)
    packed = tensors[f"{name}.weight_zero_point"]
    out, groups = module.weight_zero.shape
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (out // 8, groups)
    signed = unpack_from_int32(packed, 4, torch.Size((out, groups)), packed_dim=0)
    assert torch.equal(signed.float(), module.weight_zero.float() - 8)
    assert tensors[f"{name}.weight_scale"].dtype == torch.float32
    assert torch.equal(tensors[f"{name}.weight_scale"], module.weight_scale.float())
    assert f"{name}.weight_zero" not in tensors


def test_skipped_and_quantized_head_layers_are_the_ignore_list(llama, tmp_path):
    import transformers

    path, _ = llama
    config = WeightOnlyConfig(bits=8, modules_to_not_convert=["mlp.down_proj"], skip_output_embeddings=False)
    model = loom.LlamaForCausalLM.from_pretrained(path, quantization_config=config)
    assert isinstance(model.lm_head, Int8Linear)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["ignore"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(ref), _logits(model), **quantized_tolerance(model))


def test_old_asymmetric_int4_files_with_fractional_zero_points_load_and_save_in_loom_format(llama, tmp_path):
    """Before zero points became integers, loom's asymmetric int4 saved fractional float16 zero points in its own
    layout (quant_method loom_weight_only). Such files still load, and save back in that layout, which the
    reference refuses, rather than rounding the zero points."""
    import transformers
    from safetensors.torch import save_file

    path, _ = llama
    model = loom.LlamaForCausalLM.from_pretrained(path, quantization_config=WeightOnlyConfig(bits=4, group_size=16))
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.weight_zero = (module.weight_zero.float() + 0.375).half()  # fractional, as the old search made
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old" / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "loom_weight_only", "bits": 4, "group_size": 16,
                                     "symmetric": False, "modules_to_not_convert": None,
                                     "skip_output_embeddings": True}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))

    old = loom.LlamaForCausalLM.from_pretrained(tmp_path / "old")
    zero = old.model.layers[0].self_attn.q_proj.weight_zero
    assert not torch.equal(zero, zero.round())
    assert torch.equal(_logits(old), _logits(model))
    old.save_pretrained(tmp_path / "again")
    stored = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "loom_weight_only" and stored["symmetric"] is False
    with pytest.raises(Exception, match="mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(loom.LlamaForCausalLM.from_pretrained(tmp_path / "again")), _logits(model))


def test_gpt2_int8_keeps_loom_format_which_the_reference_refuses(tmp_path_factory, tmp_path):
    import transformers

    path, _ = reference_checkpoint(tmp_path_factory, "gpt2", "GPT2LMHeadModel")
    model = loom.GPT2LMHeadModel.from_pretrained(path, quantization_config=WeightOnlyConfig(bits=8))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "loom_weight_only"
    with pytest.raises(Exception, match="mismatch"):  # Conv1D stores (in, out): c_attn and c_fc cannot fit
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path)


def _write_old_int8_layout(model, path) -> None:
    """loom's int8 layout before compressed-tensors saving: int8 `weight`, float32 (out,) `weight_scale`, and
    quant_method loom_weight_only in config.json."""
    from safetensors.torch import save_file

    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "loom_weight_only", "bits": 8, "group_size": -1,
                                     "modules_to_not_convert": None, "skip_output_embeddings": True}
    (path / "config.json").write_text(json.dumps(config))


def test_old_loom_int8_files_still_load(llama, tmp_path):
    path, _ = llama
    model = loom.LlamaForCausalLM.from_pretrained(path, quantization_config=WeightOnlyConfig(bits=8))
    _write_old_int8_layout(model, tmp_path / "old")
    old = loom.LlamaForCausalLM.from_pretrained(tmp_path / "old")
    assert isinstance(old.model.layers[0].self_attn.q_proj, Int8Linear)
    assert torch.equal(_logits(old), _logits(model))


# -- compressed-tensors' own writer -> loom ------------------------------------------------------------------------
def _ct_checkpoint(ref_model, path, args: QuantizationArgs, fmt: str) -> dict[str, torch.Tensor]:
    """Quantize a copy of `ref_model` with compressed-tensors (min/max qparams by its own calculate_qparams),
    compress with its ModelCompressor, save; returns each quantized Linear's weight as compressed-tensors'
    decompressor defines it."""
    import copy

    model = copy.deepcopy(ref_model)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data
            if args.strategy == "group":
                w = w.reshape(w.shape[0], -1, args.group_size)
            low, high = w.amin(-1), w.amax(-1)
            if args.strategy == "tensor":
                low, high = w.amin().reshape(1), w.amax().reshape(1)
            scale, zero = calculate_qparams(low, high, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = model.state_dict()
    weights = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight_scale"):
            local = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.weight")}
            weights[name] = BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)["weight"]
    return weights


def _model_with_weights(ref_model, weights):
    import copy

    model = copy.deepcopy(ref_model)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    return model


INT = dict(type="int")
CASES = {  # id: (args, format, loom module, does the reference load it on CPU (asymmetric: with dequantize=True))
    "pack4-group-sym": (QuantizationArgs(num_bits=4, strategy="group", group_size=16, **INT), "pack-quantized",
                        Int4Linear, True),
    "pack4-group-asym": (QuantizationArgs(num_bits=4, strategy="group", group_size=16, symmetric=False, **INT),
                         "pack-quantized", Int4Linear, True),
    "pack4-channel-sym": (QuantizationArgs(num_bits=4, strategy="channel", **INT), "pack-quantized", Int4Linear,
                          True),
    "pack8-channel-sym": (QuantizationArgs(num_bits=8, strategy="channel", **INT), "pack-quantized", Int8Linear,
                          True),
    "int8-channel-sym": (QuantizationArgs(num_bits=8, strategy="channel", **INT), "int-quantized", Int8Linear, True),
    "pack8-group-sym": (QuantizationArgs(num_bits=8, strategy="group", group_size=16, **INT), "pack-quantized",
                        Int8GroupLinear, True),
    "int8-group-sym": (QuantizationArgs(num_bits=8, strategy="group", group_size=16, **INT), "int-quantized",
                       Int8GroupLinear, True),
    "int8-tensor-sym": (QuantizationArgs(num_bits=8, strategy="tensor", **INT), "int-quantized", Int8Linear, True),
    "pack8-channel-asym": (QuantizationArgs(num_bits=8, strategy="channel", symmetric=False, **INT),
                           "pack-quantized", None, True),
    "pack3-group-sym": (QuantizationArgs(num_bits=3, strategy="group", group_size=16, **INT), "pack-quantized", None,
                        True),
    "fp8-channel": (QuantizationArgs(num_bits=8, type="float", strategy="channel"), "float-quantized", None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_checkpoint_loads_with_the_writers_numbers(llama, tmp_path, case):
    args, fmt, module_cls, reference_loads = CASES[case]
    path, ref = llama
    weights = _ct_checkpoint(ref, tmp_path, args, fmt)
    model = loom.LlamaForCausalLM.from_pretrained(tmp_path)
    q = model.model.layers[0].self_attn.q_proj
    if module_cls is None:
        assert is_plain_linear(q) and q.weight.dtype == torch.float32  # dequantized at load
    else:
        assert isinstance(q, module_cls)
    for name, w in weights.items():
        got = model.get_submodule(name)
        got = got.weight if is_plain_linear(got) else dequantized_weight(got)
        torch.testing.assert_close(got, w.float(), atol=0, rtol=0, msg=name)
    assert is_plain_linear(model.lm_head)
    ours = _logits(model)
    tolerance = quantized_tolerance(model)
    torch.testing.assert_close(ours, _logits(_model_with_weights(ref, weights)), **tolerance)
    if reference_loads:
        torch.testing.assert_close(ours, _logits(_reference_load(tmp_path, args.symmetric)), **tolerance)


def test_act_order_g_idx_is_dequantized_by_its_groups(llama, tmp_path):
    """compressed-tensors 0.20 no longer writes actorder='group' (weight_g_idx), so the tensors are made here: random
    int4 values and scales packed with compressed-tensors' own pack_to_int32, columns assigned to groups along a
    random order; loom must hold w[:, j] = q[:, j] * scale[:, g_idx[j]]."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    path, ref = llama
    _ct_checkpoint(ref, tmp_path, CASES["pack4-group-sym"][0], "pack-quantized")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (tmp_path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(1)
    expected = {}
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        out, inp = tensors[f"{name}.weight_shape"].tolist()
        q = torch.randint(-8, 8, (out, inp), generator=generator, dtype=torch.int8)
        scale = torch.rand(out, inp // 16, generator=generator) / 50
        order = torch.randperm(inp, generator=generator)
        g_idx = torch.empty_like(order).index_copy_(0, order, torch.arange(inp) // 16)
        tensors.update({key: pack_to_int32(q, 4), f"{name}.weight_scale": scale,
                        f"{name}.weight_g_idx": g_idx.to(torch.int32)})
        expected[name] = q.float() * scale[:, g_idx]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = loom.LlamaForCausalLM.from_pretrained(tmp_path)
    for name, w in expected.items():
        assert is_plain_linear(model.get_submodule(name))
        torch.testing.assert_close(model.get_submodule(name).weight, w, atol=0, rtol=0, msg=name)
    want = _logits(_model_with_weights(ref, expected))
    torch.testing.assert_close(_logits(model), want, **quantized_tolerance(model))


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_checkpoint(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("ct_int4")
    _ct_checkpoint(llama[1], path, CASES["pack4-group-sym"][0], "pack-quantized")
    return path


def _copy_with(src, dst, drop=(), config_edit=None, replace=None):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if k not in drop}
    tensors.update(replace or {})
    save_file(tensors, str(dst / "model.safetensors"))
    if config_edit is not None:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_tensor_is_named(int4_checkpoint, tmp_path):
    bad = _copy_with(int4_checkpoint, tmp_path / "bad", drop=("model.layers.1.mlp.up_proj.weight_scale",))
    with pytest.raises(ValueError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.weight_scale"):
        loom.LlamaForCausalLM.from_pretrained(bad)


def test_wrong_weight_shape_is_named(int4_checkpoint, tmp_path):
    bad = _copy_with(int4_checkpoint, tmp_path / "bad",
                     replace={"model.layers.0.mlp.down_proj.weight_shape": torch.tensor([32, 32])})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_shape: holds \(32, 32\)"):
        loom.LlamaForCausalLM.from_pretrained(bad)


def test_activation_quantization_is_refused_by_field(int4_checkpoint, tmp_path):
    def add_activations(qc):
        qc["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token",
                                                               "dynamic": True, "symmetric": True}

    bad = _copy_with(int4_checkpoint, tmp_path / "bad", config_edit=add_activations)
    with pytest.raises(ValueError, match="config_groups.group_0.input_activations: activation quantization is not"):
        loom.LlamaForCausalLM.from_pretrained(bad)


def test_dequantized_model_refuses_to_save_and_config_cannot_quantize(llama, tmp_path):
    _ct_checkpoint(llama[1], tmp_path / "fp8", CASES["fp8-channel"][0], "float-quantized")
    model = loom.LlamaForCausalLM.from_pretrained(tmp_path / "fp8")
    with pytest.raises(ValueError, match="were dequantized at load"):
        model.save_pretrained(tmp_path / "out")
    config = loom.CompressedTensorsConfig(**json.loads((tmp_path / "fp8" / "config.json").read_text())[
        "quantization_config"])
    with pytest.raises(ValueError, match="already quantized; loom does not quantize into it"):
        loom.LlamaForCausalLM.from_pretrained(llama[0], quantization_config=config)
