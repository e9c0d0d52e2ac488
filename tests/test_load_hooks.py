"""The loader's extension point (loom/load_hooks.py, loom/load_stages.py): a new format is one LoadHook subclass,
registered, and nothing else; the stages call a hook's methods in their documented order; the built-in formats are
LoadHooks; and what is not a LoadHook is refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loom
from loom.load_hooks import LoadHook, register_load_hook, registered_load_hooks, unregister_load_hook
from loomtest import TINY

FORMAT_KEY = "toy_format"  # config.json marks a checkpoint of the toy format


class ScaledByTwo(LoadHook):
    """A toy format, the whole of it: float tensors are stored times two; `toy_format: "scaled_by_two"` in
    config.json says so. Loads divide by two, saves multiply again and write the marker back."""

    transforms_saves = True

    @classmethod
    def for_load(cls, request):
        return cls() if getattr(request.config, FORMAT_KEY, None) == "scaled_by_two" else None

    def configure(self, config, dtype):
        delattr(config, FORMAT_KEY)  # the model in memory is a plain one; the marker is the files'
        return dtype

    def load_tensor(self, model, name, source, dtype, device):
        if not source.dtype.is_floating_point:
            return None
        return (source.get() / 2).to(device=device, dtype=dtype)

    def checkpoint_tensors(self, model, tensors):
        return {k: v * 2 if v.is_floating_point() else v for k, v in tensors.items()}

    def saved_config_fields(self, model):
        return {FORMAT_KEY: "scaled_by_two"}


@pytest.fixture
def toy_format():
    register_load_hook(ScaledByTwo)
    yield ScaledByTwo
    unregister_load_hook(ScaledByTwo)


@pytest.fixture(scope="module")
def plain_and_scaled(tmp_path_factory):
    """A tiny Llama saved as is, and the same weights written in the toy format."""
    torch.manual_seed(0)
    model = loom.LlamaForCausalLM(loom.LlamaConfig(**TINY["llama"], tie_word_embeddings=False)).eval()
    plain = tmp_path_factory.mktemp("plain")
    model.save_pretrained(plain)
    scaled = tmp_path_factory.mktemp("scaled")
    save_file({k: v * 2 for k, v in load_file(plain / "model.safetensors").items()}, scaled / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, FORMAT_KEY: "scaled_by_two"}))
    return model, plain, scaled


def _ids():
    return torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))


def test_a_new_format_is_one_registered_hook_class(plain_and_scaled, toy_format, tmp_path):
    model, _, scaled = plain_and_scaled
    loaded = loom.AutoModelForCausalLM.from_pretrained(scaled)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert not hasattr(loaded.config, FORMAT_KEY)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits)

    loaded.save_pretrained(tmp_path / "resaved")  # saved back in the toy format: stored times two, marker written
    stored, original = load_file(tmp_path / "resaved" / "model.safetensors"), load_file(scaled / "model.safetensors")
    assert stored.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(stored[name], tensor), name
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())[FORMAT_KEY] == "scaled_by_two"
    assert not hasattr(loaded.config, FORMAT_KEY)  # the save did not leave the marker on the live config

    again = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor.to(torch.bfloat16), rtol=0, atol=0, msg=name)


def test_the_format_takes_part_only_where_it_applies(plain_and_scaled, toy_format):
    model, plain, scaled = plain_and_scaled
    untouched = loom.AutoModelForCausalLM.from_pretrained(plain)  # no marker: the hook stays out
    for name, tensor in model.state_dict().items():
        assert torch.equal(untouched.state_dict()[name], tensor), name
    unregister_load_hook(ScaledByTwo)
    unhooked = loom.AutoModelForCausalLM.from_pretrained(scaled)  # nobody reads the format: the stored values
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(unhooked.state_dict()[weight], model.state_dict()[weight] * 2)


class Recorder(LoadHook):
    """Records each stage as the loader calls it."""

    calls: list[str] = []

    @classmethod
    def for_load(cls, request):
        cls.calls.append("for_load")
        return cls()

    def checkpoint_files(self, request):
        self.calls.append("checkpoint_files")
        return None

    def configure(self, config, dtype):
        self.calls.append(f"configure {dtype}")
        return dtype

    def place_with(self, device_for):
        self.calls.append(f"place_with {device_for('lm_head.weight')}")

    def prepare_model(self, model):
        self.calls.append(f"prepare_model meta={model.lm_head.weight.is_meta}")

    def load_tensor(self, model, name, source, dtype, device):
        if name == "lm_head.weight":
            self.calls.append(f"load_tensor {name} {tuple(source.shape)}")
        return None

    def finish(self, model):
        self.calls.append(f"finish meta={any(p.is_meta for p in model.parameters())} training={model.training}")


def test_stages_call_the_hook_in_order(plain_and_scaled):
    _, plain, _ = plain_and_scaled
    Recorder.calls = []
    register_load_hook(Recorder)
    try:
        model = loom.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)
    finally:
        unregister_load_hook(Recorder)
    assert Recorder.calls == ["for_load", "configure torch.bfloat16", "checkpoint_files", "place_with cpu",
                              "prepare_model meta=True", "load_tensor lm_head.weight (99, 32)",
                              "finish meta=False training=True"]
    assert model.dtype == torch.bfloat16 and not model.training
    assert Recorder not in registered_load_hooks()
    assert not getattr(model, "_loom_save_hooks", ())  # a hook that does not change saves is not kept


def test_builtin_formats_are_load_hooks():
    from loom.distributed.tensor_parallel import TensorParallelLoadHook
    from loom.gguf.load import GgufLoadHook
    from loom.quantization import registry

    classes = [TensorParallelLoadHook, GgufLoadHook, registry.BnbQuantizer, registry.WeightOnlyQuantizer,
               registry.CompressedTensorsQuantizer, registry.GPTQQuantizer, registry.AwqQuantizer,
               registry.FP8Quantizer, registry.TorchAoQuantizer]
    assert all(issubclass(c, LoadHook) for c in classes)


def test_a_quantized_model_saves_through_its_kept_hook(plain_and_scaled, tmp_path):
    _, plain, _ = plain_and_scaled
    model = loom.AutoModelForCausalLM.from_pretrained(plain, quantization_config=loom.WeightOnlyConfig(bits=8))
    (hook,) = model._loom_save_hooks
    assert hook is model._loom_quantizer
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors"
    assert model.config.quantization_config is hook.config  # the live config keeps the loom config


def test_what_is_not_a_load_hook_is_refused_by_name(plain_and_scaled):
    class LookAlike:  # the methods, not the protocol
        def load_tensor(self, model, name, source, dtype, device):
            return None

    with pytest.raises(TypeError, match="register_load_hook takes a LoadHook subclass.*LookAlike"):
        register_load_hook(LookAlike)

    from loom import loading

    _, plain, _ = plain_and_scaled
    with loading.empty_init():
        model = loom.LlamaForCausalLM(loom.LlamaConfig(**TINY["llama"]))
    ckpt = loading.find_checkpoint_files(plain)
    with pytest.raises(TypeError, match="LookAlike is not a loom.load_hooks.LoadHook"):
        loading.stream_checkpoint(model, ckpt, dtype=None, device_for=lambda n: torch.device("cpu"),
                                  hooks=[LookAlike()])


def test_a_for_load_that_returns_something_else_is_refused(plain_and_scaled):
    class Broken(LoadHook):
        @classmethod
        def for_load(cls, request):
            return "yes"

    register_load_hook(Broken)
    try:
        with pytest.raises(TypeError, match="str is not a loom.load_hooks.LoadHook"):
            loom.AutoModelForCausalLM.from_pretrained(plain_and_scaled[1])
    finally:
        unregister_load_hook(Broken)


def test_a_format_that_cannot_save_makes_save_pretrained_refuse_by_name(plain_and_scaled, tmp_path):
    class ReadOnlyFormat(LoadHook):
        transforms_saves = True

        @classmethod
        def for_load(cls, request):
            return cls()

        def is_serializable(self):
            return False

        def why_not_serializable(self):
            return "its tensors were expanded at load; keep the original files"

    register_load_hook(ReadOnlyFormat)
    try:
        model = loom.AutoModelForCausalLM.from_pretrained(plain_and_scaled[1])
    finally:
        unregister_load_hook(ReadOnlyFormat)
    with pytest.raises(ValueError, match="ReadOnlyFormat models cannot be saved: its tensors were expanded"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
