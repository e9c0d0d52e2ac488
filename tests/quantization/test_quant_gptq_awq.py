"""GPTQ and AWQ checkpoints, packed by hand here from the formats' definitions (neither auto-gptq nor autoawq is
installed, and the reference needs them): the weights loom holds dequantize to exactly w = (q - zero) * scale of the
packing, logits equal a model whose Linears hold those weights, and a loaded model saves back the same tensors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loom
from loom.kernels import is_plain_linear
from loom.quantization.gptq_awq import ActOrderInt4Linear
from loom.quantization.linear import Int4Linear, Int8Linear, dequantized_weight
from loomtest import quantized_tolerance, reference_checkpoint

IDS = torch.tensor([[5, 17, 33, 2, 64, 8, 91, 40], [7, 7, 12, 80, 3, 55, 21, 9]])
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")


def _words(acc: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(acc >= 2 ** 31, acc - 2 ** 32, acc).to(torch.int32)


def pack_along_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's qweight packing: value (r, c) goes to word (r // (32/bits), c) at bit bits * (r % (32/bits))."""
    per = 32 // bits
    acc = torch.zeros(u.shape[0] // per, u.shape[1], dtype=torch.int64)
    for j in range(per):
        acc |= u[j::per].to(torch.int64) << (bits * j)
    return _words(acc)


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing along columns: nibble i of word c holds column 8c + AWQ_ORDER[i]."""
    acc = torch.zeros(u.shape[0], u.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        acc |= u[:, col::8].to(torch.int64) << (4 * i)
    return _words(acc)


def _quantize(w: torch.Tensor, bits: int, group_of: torch.Tensor, groups: int, sym: bool):
    """Min/max quantization per group of inputs: unsigned q (out, in), zero (groups, out) ints, fp16 scales."""
    top = 2 ** bits - 1
    scales, zeros = [], []
    for g in range(groups):
        cols = w[:, group_of == g]
        if sym:
            scale = (cols.abs().amax(1) / (top // 2)).clamp(min=1e-5)
            zero = torch.full_like(scale, (top + 1) // 2)
        else:
            low, high = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scale = ((high - low) / top).clamp(min=1e-5)
            zero = torch.round(-low / scale.half().float()).clamp(0, top)
        scales.append(scale.half())
        zeros.append(zero.long())
    scales, zeros = torch.stack(scales), torch.stack(zeros)  # (groups, out)
    s, z = scales.float().t()[:, group_of], zeros.t()[:, group_of]
    q = torch.round(w / s + z).clamp(0, top).long()
    return q, zeros, scales


def _write(ref, path, quantization_config, tensors_of) -> dict[str, torch.Tensor]:
    """A checkpoint of `ref` with each Linear but lm_head replaced by tensors_of(name, weight) -> (stored tensors,
    the dequantized weight they define); returns those weights."""
    path.mkdir()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    weights = {}
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            del state[f"{name}.weight"]
            stored, weights[name] = tensors_of(name, module.weight.detach())
            state.update({f"{name}.{k}": v for k, v in stored.items()})
    save_file(state, str(path / "model.safetensors"))
    config = ref.config.to_dict()
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    return weights


def gptq_checkpoint(ref, path, bits=4, group_size=16, sym=False, desc_act=False, fmt="gptq", seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensors_of(name, w):
        out, inp = w.shape
        group = inp if group_size == -1 else group_size
        groups = inp // group
        g_idx = torch.arange(inp) // group
        if desc_act:  # act-order: inputs visited in a random order, groups formed along it
            order = torch.randperm(inp, generator=generator)
            g_idx = torch.empty_like(g_idx).index_copy_(0, order, torch.arange(inp) // group)
        q, zeros, scales = _quantize(w, bits, g_idx, groups, sym)
        stored_zeros = (zeros - (1 if fmt == "gptq" else 0)) & (2 ** bits - 1)
        read_zeros = stored_zeros + (1 if fmt == "gptq" else 0)  # what every GPTQ reader computes
        dequant = (q - read_zeros.t()[:, g_idx]).float() * scales.float().t()[:, g_idx]
        stored = {"qweight": pack_along_rows(q.t(), bits),
                  "qzeros": pack_along_rows(stored_zeros.t(), bits).t().contiguous(), "scales": scales,
                  "g_idx": g_idx.to(torch.int32)}
        return stored, dequant

    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
              "checkpoint_format": fmt, "damp_percent": 0.01, "true_sequential": True}
    return _write(ref, path, config, tensors_of)


def awq_checkpoint(ref, path, group_size=16):
    def tensors_of(name, w):
        g_idx = torch.arange(w.shape[1]) // group_size
        q, zeros, scales = _quantize(w, 4, g_idx, w.shape[1] // group_size, sym=False)
        dequant = (q - zeros.t()[:, g_idx]).float() * scales.float().t()[:, g_idx]
        return {"qweight": pack_awq(q.t()), "qzeros": pack_awq(zeros), "scales": scales}, dequant

    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    return _write(ref, path, config, tensors_of)


def _held_weight(module) -> torch.Tensor:
    if is_plain_linear(module):
        return module.weight
    w = dequantized_weight(module)
    if isinstance(module, ActOrderInt4Linear):  # columns sorted by group at load
        w = torch.empty_like(w).index_copy_(1, module.input_order, w)
    return w


def _check_loads(ref, path, weights, module_cls):
    import copy

    model = loom.AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model.model.layers[0].mlp.down_proj, module_cls)
    assert is_plain_linear(model.lm_head)
    for name, w in weights.items():
        torch.testing.assert_close(_held_weight(model.get_submodule(name)), w, atol=0, rtol=0, msg=name)
    expected = copy.deepcopy(ref)
    with torch.no_grad():
        for name, w in weights.items():
            expected.get_submodule(name).weight.copy_(w)
        torch.testing.assert_close(model(IDS).logits, expected(IDS).logits, **quantized_tolerance(model))
    return model


def _check_saves_back(model, path, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    original, saved = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "saved" /
                                                                                "model.safetensors"))
    assert set(saved) == set(original)
    for key, t in original.items():
        assert saved[key].dtype == t.dtype and torch.equal(saved[key], t), key
    stored = json.loads((path / "config.json").read_text())["quantization_config"]
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"] == stored


GPTQ_CASES = {
    "v1-asym": dict(), "v2-asym": dict(fmt="gptq_v2"), "v1-sym": dict(sym=True),
    "v1-asym-act-order": dict(desc_act=True), "v2-sym-act-order": dict(fmt="gptq_v2", sym=True, desc_act=True),
    "v1-asym-per-channel": dict(group_size=-1),
}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_int4_runs_on_loom_kernel_with_the_packings_weights(llama, tmp_path, case):
    path, ref = llama
    kwargs = GPTQ_CASES[case]
    weights = gptq_checkpoint(ref, tmp_path / "gptq", **kwargs)
    cls = ActOrderInt4Linear if kwargs.get("desc_act") else Int4Linear
    model = _check_loads(ref, tmp_path / "gptq", weights, cls)
    assert model.model.layers[0].mlp.down_proj.asymmetric == (not kwargs.get("sym", False))
    _check_saves_back(model, tmp_path / "gptq", tmp_path)


def test_gptq_linears_with_bias(tmp_path_factory, tmp_path):
    path, ref = reference_checkpoint(tmp_path_factory, "qwen2", "Qwen2ForCausalLM")  # q/k/v carry a bias
    weights = gptq_checkpoint(ref, tmp_path / "gptq", desc_act=True)
    model = _check_loads(ref, tmp_path / "gptq", weights, ActOrderInt4Linear)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    _check_saves_back(model, tmp_path / "gptq", tmp_path)


@pytest.mark.parametrize("group_size,cls", [(-1, Int8Linear), (16, torch.nn.Linear)])
def test_gptq_int8(llama, tmp_path, group_size, cls):
    path, ref = llama
    weights = gptq_checkpoint(ref, tmp_path / "gptq", bits=8, group_size=group_size, sym=group_size == -1)
    model = _check_loads(ref, tmp_path / "gptq", weights, cls)
    if cls is Int8Linear:
        _check_saves_back(model, tmp_path / "gptq", tmp_path)
    else:  # dequantized at load: the integers are gone
        with pytest.raises(ValueError, match="dequantized at load"):
            model.save_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("kwargs", [dict(desc_act=True), dict(bits=8, group_size=16)], ids=["int4-act-order",
                                                                                         "int8-dequantized"])
def test_bf16_compute_dtype(llama, tmp_path, kwargs):
    path, ref = llama
    gptq_checkpoint(ref, tmp_path / "gptq", **kwargs)
    full = loom.LlamaForCausalLM.from_pretrained(tmp_path / "gptq")
    half = loom.LlamaForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.bfloat16)
    assert half.model.norm.weight.dtype == torch.bfloat16
    if kwargs.get("bits") == 8:  # dequantized at load in float32, then cast like any weight
        assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = full(IDS).logits, half(IDS).logits
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a, atol=2e-2, rtol=2e-2)  # bf16 activations: ~3 significant digits


def test_awq_gemm_runs_on_loom_kernel_with_the_packings_weights(llama, tmp_path):
    path, ref = llama
    weights = awq_checkpoint(ref, tmp_path / "awq")
    model = _check_loads(ref, tmp_path / "awq", weights, Int4Linear)
    _check_saves_back(model, tmp_path / "awq", tmp_path)


def test_a_layers_tensors_split_across_shards(llama, tmp_path):
    path, ref = llama
    weights = awq_checkpoint(ref, tmp_path / "awq")
    tensors = load_file(str(tmp_path / "awq" / "model.safetensors"))
    # each quantized layer's qweight in one shard, its qzeros and scales in the other
    first = {k: v for k, v in tensors.items() if not k.endswith(("qzeros", "scales"))}
    second = {k: v for k, v in tensors.items() if k not in first}
    (tmp_path / "awq" / "model.safetensors").unlink()
    save_file(second, str(tmp_path / "awq" / "model-00001-of-00002.safetensors"))
    save_file(first, str(tmp_path / "awq" / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in second}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in first})
    (tmp_path / "awq" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _check_loads(ref, tmp_path / "awq", weights, Int4Linear)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_bad_gptq_input_is_named(llama, tmp_path):
    path, ref = llama
    gptq_checkpoint(ref, tmp_path / "a", desc_act=True)
    _edit_config(tmp_path / "a", group_size=20)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: group_size=20 \(quantization_config"
                                         r"\.group_size\) does not divide its in_features=32"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path / "a")
    _edit_config(tmp_path / "a", group_size=16, bits=3)
    with pytest.raises(ValueError, match="GPTQConfig: bits=3 is not supported"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path / "a")

    gptq_checkpoint(ref, tmp_path / "b", desc_act=True)
    tensors = load_file(str(tmp_path / "b" / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.endswith("g_idx")}, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"the GPTQ checkpoint lacks model\.layers\.0\.[a-z_.]+\.g_idx"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path / "b")

    gptq_checkpoint(ref, tmp_path / "c", desc_act=True)
    _edit_config(tmp_path / "c", desc_act=False)  # act-order g_idx but the config says otherwise
    with pytest.raises(ValueError, match=r"g_idx: desc_act=false, but g_idx does not hold consecutive groups"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path / "c")


def test_bad_awq_input_is_named(llama, tmp_path):
    path, ref = llama
    awq_checkpoint(ref, tmp_path / "a")
    _edit_config(tmp_path / "a", version="gemv")
    with pytest.raises(ValueError, match="AwqConfig: version='gemv' is not supported"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path / "a")
    _edit_config(tmp_path / "a", version="gemm", group_size=32)
    with pytest.raises(ValueError, match=r"mlp\.down_proj: group_size=32 .* does not divide its in_features=48"):
        loom.LlamaForCausalLM.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("fmt", ["gptq-act-order", "awq"])
def test_8_bit_activations_on_gptq_and_awq_layers(tmp_path_factory, tmp_path, fmt):
    """set_activation_bits reaches the Int4Linears a GPTQ (act-order too) or AWQ checkpoint loads into; saving
    afterwards still writes the original tensors and config."""
    from loom.quantization import set_activation_bits

    _, ref = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM", intermediate_size=64)
    path = tmp_path / fmt
    if fmt == "awq":
        awq_checkpoint(ref, path, group_size=32)
    else:
        gptq_checkpoint(ref, path, group_size=32, desc_act=True)
    model = loom.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        before = model(IDS).logits  # 16 rows: the decode-size path
        assert set_activation_bits(model, 8) == 14  # every Linear but the head
        after = model(IDS).logits
    assert not torch.equal(after, before) and (after - before).abs().max() <= 0.02 * before.abs().max()
    _check_saves_back(model, path, tmp_path)
