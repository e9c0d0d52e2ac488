"""torchao checkpoints written by the reference with torchao itself (TorchAoConfig(Int8WeightOnlyConfig)) load in
loom without torchao, into loom's Int8Linear with torchao's exact values and the reference's logits; saved again they
are compressed-tensors, which the reference reads without torchao. Other torchao configs are refused by name."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import loom
from loom.quantization.linear import Int8Linear, dequantized_weight
from loomtest import quantized_tolerance, reference_checkpoint

torchao = pytest.importorskip("torchao", reason="torchao (dev extra) writes the test checkpoints")
from torchao.quantization import Int8WeightOnlyConfig, PerRow, PerTensor  # noqa: E402

IDS = torch.tensor([[5, 17, 33, 2, 64, 8, 91, 40], [7, 7, 12, 80, 3, 55, 21, 9]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")[0]


def _torchao_checkpoint(src, dst, granularity):
    import transformers

    config = transformers.TorchAoConfig(Int8WeightOnlyConfig(granularity=granularity))
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=config)
    ref.save_pretrained(dst)
    return transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def checkpoints(llama, tmp_path_factory):
    """granularity -> (directory, the reference's load of it)"""
    made = {}
    for kind, granularity in (("row", PerRow()), ("tensor", PerTensor())):
        path = tmp_path_factory.mktemp(f"torchao-{kind}")
        made[kind] = path, _torchao_checkpoint(llama, path, granularity)
    return made


@pytest.fixture(params=["row", "tensor"])
def int8(request, checkpoints):
    return checkpoints[request.param]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_int8_loads_on_loom_kernel_with_torchao_values(int8, monkeypatch):
    path, ref = int8
    monkeypatch.setitem(sys.modules, "torchao", None)  # loom reads the files without torchao
    model = loom.AutoModelForCausalLM.from_pretrained(path)
    monkeypatch.undo()
    assert isinstance(model.model.layers[1].mlp.up_proj, Int8Linear) and not isinstance(model.lm_head, Int8Linear)
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            assert torch.equal(dequantized_weight(module), ref.get_submodule(name).weight.dequantize()), name
    torch.testing.assert_close(_logits(model), _logits(ref), **quantized_tolerance(model))
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert model.generate(IDS, **kw).tolist() == ref.generate(IDS, **kw).tolist()


def test_saves_compressed_tensors_the_reference_reads(int8, tmp_path):
    import transformers

    path, _ = int8
    model = loom.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")
    stored = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "compressed-tensors" and stored["ignore"] == ["lm_head"]
    assert stored["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    again = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(again), _logits(model))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(ref), _logits(model), **quantized_tolerance(model))


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.fixture
def copy(checkpoints, tmp_path):
    shutil.copytree(checkpoints["row"][0], tmp_path / "ao")
    return tmp_path / "ao"


def _edit(path, config_edit=None, tensor_edit=None):
    if config_edit:
        config = json.loads((path / "config.json").read_text())
        config_edit(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))
    if tensor_edit:
        tensors = load_file(path / "model.safetensors")
        tensor_edit(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda qc: qc["quant_type"]["default"].update(_type="Int4WeightOnlyConfig"),
     "quant_type='Int4WeightOnlyConfig' is not supported: loom reads torchao checkpoints of Int8WeightOnlyConfig"),
    (lambda qc: qc.update(quant_type="int4_weight_only"), "quant_type='int4_weight_only' is not supported"),
    (lambda qc: qc["quant_type"]["default"]["_data"].update(granularity={"_type": "PerGroup", "_data": {}}),
     "quant_type Int8WeightOnlyConfig with granularity 'PerGroup'"),
    (lambda qc: qc.update(include_input_output_embeddings=True), "include_input_output_embeddings=true"),
])
def test_unsupported_configs_are_named(copy, edit, message):
    _edit(copy, config_edit=edit)
    with pytest.raises(ValueError, match=f"quantization_config.{message}"):
        loom.AutoModelForCausalLM.from_pretrained(copy)


def test_bad_tensors_are_named(copy, tmp_path):
    name = "model.layers.0.mlp.up_proj"
    shutil.copytree(copy, tmp_path / "zero")
    _edit(tmp_path / "zero", tensor_edit=lambda t: t[f"{name}._weight_zero_point"].fill_(3))
    with pytest.raises(ValueError, match=rf"{name}\._weight_zero_point: holds non-zero zero points"):
        loom.AutoModelForCausalLM.from_pretrained(tmp_path / "zero")
    shutil.copytree(copy, tmp_path / "float")

    def unquantize(t):
        t[f"{name}.weight"] = t.pop(f"{name}._weight_qdata").float()
    _edit(tmp_path / "float", tensor_edit=unquantize)
    with pytest.raises(ValueError, match=rf"{name}\.weight: a plain torch.float32 weight where torchao's"):
        loom.AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    _edit(copy, tensor_edit=lambda t: t.pop(f"{name}._weight_scale"))
    with pytest.raises(ValueError, match=rf"torchao checkpoint lacks {name}\._weight_scale"):
        loom.AutoModelForCausalLM.from_pretrained(copy)
