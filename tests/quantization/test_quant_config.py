"""Quantization configs: the reference's config.json form, dispatch from a dict, command-line words, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from loom.quantization import BitsAndBytesConfig, WeightOnlyConfig, config_from_dict, config_from_flag, get_quantizer
from loom.quantization.config import WEIGHT_ONLY_METHOD

BNB_CASES = [
    dict(load_in_8bit=True),
    dict(load_in_8bit=True, llm_int8_threshold=4.0, llm_int8_skip_modules=["fc"], llm_int8_has_fp16_weight=True),
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
         bnb_4bit_compute_dtype=torch.bfloat16),
    dict(load_in_4bit=True, bnb_4bit_compute_dtype="float16", bnb_4bit_quant_storage="bfloat16"),
]


@pytest.mark.parametrize("kwargs", BNB_CASES)
def test_bnb_config_serialises_like_the_reference(kwargs):
    import transformers

    ours = BitsAndBytesConfig(**kwargs).to_dict()
    ref = transformers.BitsAndBytesConfig(**kwargs).to_dict()
    # what lands in config.json: json text with sorted keys, byte for byte
    assert json.dumps(ours, sort_keys=True) == json.dumps(ref, sort_keys=True)


@pytest.mark.parametrize("kwargs", BNB_CASES)
def test_bnb_config_round_trips_through_its_dict(kwargs):
    cfg = BitsAndBytesConfig(**kwargs)
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert isinstance(again, BitsAndBytesConfig) and again == cfg


def test_weight_only_config_round_trip_and_defaults():
    four, eight = WeightOnlyConfig(bits=4), WeightOnlyConfig(bits=8)
    assert (four.group_size, four.symmetric) == (32, False)
    assert (eight.group_size, eight.symmetric) == (-1, True)
    cfg = WeightOnlyConfig(bits=4, group_size=64, symmetric=True, modules_to_not_convert=["mlp"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["quant_method"] == WEIGHT_ONLY_METHOD
    assert config_from_dict(d) == cfg
    assert config_from_dict(four.to_dict()) == four
    # int4 checkpoints saved before `symmetric` existed are symmetric
    assert config_from_dict({"quant_method": WEIGHT_ONLY_METHOD, "bits": 4, "group_size": 128}).symmetric


def test_flag_words_map_to_configs():
    assert config_from_flag("int8") == WeightOnlyConfig(bits=8)
    assert config_from_flag("INT4") == WeightOnlyConfig(bits=4)
    assert config_from_flag("bnb-8bit").load_in_8bit
    four = config_from_flag("bnb-4bit")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4"
    with pytest.raises(ValueError, match="--quantize 'int3'.*int8, int4, bnb-8bit, bnb-4bit"):
        config_from_flag("int3")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(load_in_8bit=True, load_in_4bit=True), ValueError, "load_in_8bit=True and load_in_4bit=True"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), ValueError, "bnb_4bit_quant_type='int4'"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype="float7"), ValueError, "bnb_4bit_compute_dtype='float7'"),
    (dict(load_in_8bit="yes"), TypeError, "load_in_8bit must be True or False"),
    (dict(load_in_8bit=True, llm_int8_skip_modules="lm_head"), TypeError, "llm_int8_skip_modules must be a list"),
])
def test_bnb_config_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        BitsAndBytesConfig(**kwargs)


def test_bnb_flags_cannot_both_be_set_later():
    cfg = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(ValueError, match="load_in_4bit=True while load_in_8bit=True"):
        cfg.load_in_4bit = True


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits=3"),
    (dict(bits=4, group_size=0), "group_size=0"),
    (dict(bits=4, group_size=33), "group_size=33 must be even"),
    (dict(bits=8, group_size=64), "group_size=64 is only for bits=4"),
    (dict(bits=8, symmetric=False), "symmetric=False is only for bits=4"),
    (dict(bits=4, symmetric="no"), "symmetric must be True or False"),
])
def test_weight_only_config_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        WeightOnlyConfig(**kwargs)


def test_unknown_method_and_type_are_named():
    with pytest.raises(ValueError, match="quant_method='hqq'.*'bitsandbytes', 'loom_weight_only', 'compressed-tensors', "
                                         "'gptq', 'awq', 'fp8', 'torchao'"):
        config_from_dict({"quant_method": "hqq", "nbits": 4})
    with pytest.raises(TypeError, match="quantization_config must be one of BitsAndBytesConfig"):
        get_quantizer(None, "int8")
    with pytest.raises(ValueError, match="set load_in_8bit=True or load_in_4bit=True"):
        get_quantizer(None, BitsAndBytesConfig())


def test_requantizing_a_prequantized_checkpoint_is_refused():
    class Cfg:
        quantization_config = WeightOnlyConfig(bits=8).to_dict()

    assert get_quantizer(Cfg(), None).pre_quantized
    assert get_quantizer(Cfg(), WeightOnlyConfig(bits=8)).pre_quantized  # the same config is fine
    with pytest.raises(ValueError, match="quantization_config: this checkpoint is already quantized"):
        get_quantizer(Cfg(), WeightOnlyConfig(bits=4))
