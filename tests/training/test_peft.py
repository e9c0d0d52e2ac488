"""PEFT on loom models, driven through peft itself and compared with the reference: LoRA training in loom's Trainer
with step losses equal to the reference Trainer's (the shifted causal loss, columns read from the wrapped model),
gradient checkpointing with adapters, adapters moving both ways with equal logits, the adapter methods on the model,
QLoRA on loom's int8/int4 and on bitsandbytes 4-bit, and clear errors for adapters that do not fit."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.training import Trainer
from loom.training.data import EpochSampler
from loomtest import reference_checkpoint
from tests.training.conftest import PadCollator, cls_rows, lm_rows

peft = pytest.importorskip("peft", reason="the PEFT tests drive peft itself (pip install peft)")

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")[0]


class SequentialTrainer(Trainer):
    """loom's Trainer in dataset order (the reference runs with train_sampling_strategy="sequential")."""

    def _train_sampler(self, dataset):
        return EpochSampler(len(dataset), self.args.seed, shuffle=False)


def _peft_pair(loom_model, ref_model, **config):
    """The same LoRA config on both models, the loom adapter initialised with the reference's initial weights."""
    ref = peft.get_peft_model(ref_model, peft.LoraConfig(**config))
    ours = peft.get_peft_model(loom_model, peft.LoraConfig(**config))
    state = peft.get_peft_model_state_dict(ref)
    result = peft.set_peft_model_state_dict(ours, state)
    assert not result.unexpected_keys
    return ours, ref


def _llama_pair(path, **config):
    import transformers

    return _peft_pair(loom.AutoModelForCausalLM.from_pretrained(path),
                      transformers.AutoModelForCausalLM.from_pretrained(path), **{**LORA, **config})


def _step_losses(trainer) -> list[float]:
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def _train_both(tmp_path, ours, ref, rows, collator=None, **args):
    """Train both wrapped models on the same rows in the same order; returns (loom losses, reference losses)."""
    import transformers

    common = {**dict(max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, seed=0), **args}
    loom_args = loom.TrainingArguments(output_dir=str(tmp_path / "loom"), disable_tqdm=True, **common)
    ref_args = transformers.TrainingArguments(output_dir=str(tmp_path / "ref"), disable_tqdm=True,
                                              train_sampling_strategy="sequential", **common)
    loom_losses = _step_losses(SequentialTrainer(model=ours, args=loom_args, train_dataset=rows,
                                                 data_collator=collator))
    ref_losses = _step_losses(transformers.Trainer(model=ref, args=ref_args, train_dataset=rows,
                                                   data_collator=collator))
    return loom_losses, ref_losses


@pytest.mark.parametrize("task_type, remove_unused_columns, gradient_checkpointing", [
    ("CAUSAL_LM", True, False),
    (None, True, False),  # a plain PeftModel: the columns come from the wrapped model's forward
    (None, False, False),  # the case that trained on an unshifted loss
    ("CAUSAL_LM", True, True),
])
def test_lora_step_losses_equal_the_reference(llama_dir, tmp_path, task_type, remove_unused_columns,
                                              gradient_checkpointing):
    ours, ref = _llama_pair(llama_dir, task_type=task_type)
    rows = lm_rows(80, seed=5)
    loom_losses, ref_losses = _train_both(tmp_path, ours, ref, rows, PadCollator(), gradient_accumulation_steps=2,
                                          remove_unused_columns=remove_unused_columns,
                                          gradient_checkpointing=gradient_checkpointing)
    assert len(loom_losses) == len(ref_losses) == 10
    assert loom_losses == pytest.approx(ref_losses, abs=1e-5)
    assert loom_losses[-1] < loom_losses[0]  # the adapters learn
    assert ours.get_base_model().is_gradient_checkpointing is gradient_checkpointing
    for name, p in ours.named_parameters():
        assert p.requires_grad == ("lora_" in name), name


def test_bert_sequence_classification_lora_equals_the_reference(tmp_path_factory, tmp_path):
    import transformers

    path = reference_checkpoint(tmp_path_factory, "bert", "BertForSequenceClassification",
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)[0]
    ours, ref = _peft_pair(loom.AutoModelForSequenceClassification.from_pretrained(path),
                           transformers.AutoModelForSequenceClassification.from_pretrained(path),
                           task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["query", "value"])
    assert any("classifier.modules_to_save" in n for n, p in ours.named_parameters() if p.requires_grad)
    loom_losses, ref_losses = _train_both(tmp_path, ours, ref, cls_rows(40))
    assert loom_losses == pytest.approx(ref_losses, abs=1e-5)
    # the trained adapter and classifier (modules_to_save) load into the reference and through loom's Auto class
    ours.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(6))
    trained = _logits(ours.eval(), ids)
    in_ref = peft.PeftModel.from_pretrained(transformers.AutoModelForSequenceClassification.from_pretrained(path),
                                            tmp_path / "adapter")
    torch.testing.assert_close(_logits(in_ref, ids), trained, atol=1e-5, rtol=1e-5)
    in_loom = loom.AutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(_logits(in_loom, ids), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task_type, model_type, head, target", [
    ("TOKEN_CLS", "bert", "BertForTokenClassification", ["query", "value"]),
    ("QUESTION_ANS", "bert", "BertForQuestionAnswering", ["query", "value"]),
    ("FEATURE_EXTRACTION", "bert", "BertModel", ["query", "value"]),
    ("CAUSAL_LM", "llama", "LlamaForCausalLM", ["q_proj", "v_proj"]),
])
def test_every_task_type_gives_the_reference_outputs(tmp_path_factory, task_type, model_type, head, target):
    import transformers

    path = reference_checkpoint(tmp_path_factory, model_type, head)[0]
    config = dict(task_type=task_type, r=4, lora_alpha=8, target_modules=target, init_lora_weights=False)
    ours, ref = _peft_pair(getattr(loom, head).from_pretrained(path), getattr(transformers, head).from_pretrained(
        path), **config)
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = ours(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask)
    keys = [k for k in b.keys() if torch.is_tensor(b[k])]
    assert keys
    for key in keys:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_generate_through_a_peft_model_is_the_reference_greedy(llama_dir):
    ours, ref = _llama_pair(llama_dir, task_type="CAUSAL_LM", init_lora_weights=False)
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours.generate(input_ids=ids, **kw).tolist() == ref.generate(input_ids=ids, **kw).tolist()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_move_both_ways_with_equal_logits(llama_dir, tmp_path):
    import transformers

    ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(2))
    ours, ref = _llama_pair(llama_dir, task_type="CAUSAL_LM", init_lora_weights=False)
    ref_logits = _logits(ref, ids)
    with torch.no_grad():  # make the adapters differ, so each direction proves it carried the weights
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    ours.save_pretrained(tmp_path / "from_loom")
    loaded_in_ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama_dir),
                                                   tmp_path / "from_loom")
    torch.testing.assert_close(_logits(loaded_in_ref, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)

    ref.save_pretrained(tmp_path / "from_ref")
    loaded_in_loom = peft.PeftModel.from_pretrained(loom.AutoModelForCausalLM.from_pretrained(llama_dir),
                                                    tmp_path / "from_ref")
    torch.testing.assert_close(_logits(loaded_in_loom, ids), ref_logits, atol=1e-5, rtol=1e-5)
    # an adapter directory loads through the Auto class: the base model comes from adapter_config.json
    auto = loom.AutoModelForCausalLM.from_pretrained(tmp_path / "from_ref")
    assert auto.active_adapters() == ["default"]
    torch.testing.assert_close(_logits(auto, ids), ref_logits, atol=1e-5, rtol=1e-5)


def test_adapter_methods_on_the_model_match_the_reference(llama_dir, tmp_path):
    import transformers

    ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(3))
    ours = loom.AutoModelForCausalLM.from_pretrained(llama_dir)
    ref = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama_dir),
                              peft.LoraConfig(**LORA, init_lora_weights=False))
    base = _logits(ours, ids)
    ref.save_pretrained(tmp_path / "adapter")
    ours.load_adapter(tmp_path / "adapter")
    assert ours.active_adapters() == ref.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)  # unless is_trainable
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(ours, ids), base, atol=1e-3)
    ours.disable_adapters()
    torch.testing.assert_close(_logits(ours, ids), base)
    ours.enable_adapters()
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)
    mine = ours.get_adapter_state_dict()
    theirs = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(ref).items()}
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key])

    ours.add_adapter(peft.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="fresh")
    assert ours.active_adapters() == ["fresh"]
    assert all(p.requires_grad == (".fresh." in n) for n, p in ours.named_parameters() if "lora_" in n)
    torch.testing.assert_close(_logits(ours, ids), base)  # a fresh LoRA starts as the identity (B = 0)
    ours.set_adapter("default")
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)
    ours.delete_adapter("fresh")
    assert list(ours.peft_config) == ["default"] and not any(".fresh." in n for n, _ in ours.named_parameters())
    # a model holding adapters saves its active adapter only, in peft's format
    ours.save_pretrained(tmp_path / "resaved")
    assert sorted(p.name for p in (tmp_path / "resaved").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama_dir),
                                              tmp_path / "resaved")
    torch.testing.assert_close(_logits(reloaded, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no adapter named \\['nope'\\]"):
        ours.set_adapter("nope")


def test_input_require_grads_switch(llama_dir):
    model = loom.AutoModelForCausalLM.from_pretrained(llama_dir)
    model.requires_grad_(False)
    ids = torch.randint(3, 99, (1, 4))
    embed = model.get_input_embeddings()
    model.enable_input_require_grads()
    assert embed(ids).requires_grad
    model.disable_input_require_grads()
    assert not embed(ids).requires_grad
    with pytest.raises(ValueError, match="has no adapter; add one with add_adapter"):
        model.active_adapters()


def test_adapters_that_do_not_fit_are_named(llama_dir, tmp_path_factory, tmp_path):
    model = loom.AutoModelForCausalLM.from_pretrained(llama_dir)
    model.add_adapter(peft.LoraConfig(**LORA))
    model.save_pretrained(tmp_path / "adapter")
    wider = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM", hidden_size=64)[0]
    with pytest.raises(ValueError, match=r"does not match LlamaForCausalLM: model\.layers\.0\.self_attn\.\w_proj\.lora_A\."
                                         r"weight \(4, 32\) vs the model's \(4, 64\).*base model it was trained on"):
        wide = loom.AutoModelForCausalLM.from_pretrained(wider)
        wide.load_adapter(tmp_path / "adapter")
    assert not any("lora_" in n for n, _ in wide.named_parameters())  # the failed load left no adapter behind
    with pytest.raises(ValueError, match="has no adapter"):
        wide.active_adapters()
    bert = loom.AutoModel.from_pretrained(reference_checkpoint(tmp_path_factory, "bert", "BertModel")[0])
    with pytest.raises(ValueError, match=r"does not fit BertModel: .*q_proj.*Load the base model"):
        bert.load_adapter(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"holds weights LlamaForCausalLM has no place for \(.*v_proj\.lora_A"):
        model.load_adapter(peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]), adapter_state_dict=saved,
                           adapter_name="partial")
    assert list(model.peft_config) == ["default"]
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        model.load_adapter(tmp_path, adapter_name="other")
    with pytest.raises(ValueError, match="Target modules .*not found"):  # peft's own check, before any training
        peft.get_peft_model(loom.AutoModelForCausalLM.from_pretrained(llama_dir),
                            peft.LoraConfig(target_modules=["qproj"]))


# -- QLoRA ---------------------------------------------------------------------------------------------------------
def _dequantized_copy(model):
    """The model with every loom quantized Linear replaced by a float Linear holding its dequantized weight."""
    import copy

    from loom.quantization.base import replace_module
    from loom.quantization.linear import dequantized_weight

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if getattr(module, "_loom_quantized", False):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = dequantized_weight(module)
            replace_module(model, name, linear)
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_on_loom_int8_and_int4(llama_dir, tmp_path, bits):
    from loom.quantization import WeightOnlyConfig

    model = loom.AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=WeightOnlyConfig(bits=bits, group_size=16 if bits == 4 else None))
    model = peft.prepare_model_for_kbit_training(model)
    # adapters on layer 0's queries only: their gradient reaches them through quantized layers above
    config = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0],
                  init_lora_weights=False)
    ours = peft.get_peft_model(model, peft.LoraConfig(**config))
    assert type(ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == f"Int{bits}Linear"
    float_twin = _dequantized_copy(ours)
    ids = torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(4))
    for m in (ours, float_twin):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    twin = dict(float_twin.named_parameters())
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():  # the quantized layers pass their input gradient on exactly
        torch.testing.assert_close(grad, twin[name].grad, atol=1e-5, rtol=1e-4)

    ours.zero_grad()
    args = loom.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                                  learning_rate=2e-2, logging_steps=1, save_strategy="no", report_to="none",
                                  disable_tqdm=True)
    losses = _step_losses(Trainer(model=ours, args=args, train_dataset=lm_rows(32, seed=6),
                                  data_collator=PadCollator()))
    assert losses[-1] < losses[0]
    with pytest.raises(RuntimeError):  # merging into integer weights is refused (dequantize first)
        ours.merge_and_unload()


def test_qlora_on_bitsandbytes_4bit_equals_the_reference(tmp_path_factory, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional dependency (pip install bitsandbytes)")
    import transformers

    # bitsandbytes' CPU 4-bit path needs in_features a multiple of its blocksize (see tests/quantization)
    path = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM", hidden_size=64,
                                intermediate_size=128)[0]
    bnb = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    # peft's k-bit preparation: base frozen, gradient checkpointing on, input embeddings' output requiring grad
    ours = peft.prepare_model_for_kbit_training(loom.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=loom.BitsAndBytesConfig(**bnb)))
    ref = peft.prepare_model_for_kbit_training(transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.BitsAndBytesConfig(**bnb)))
    assert ours.is_gradient_checkpointing and not any(p.requires_grad for p in ours.parameters())
    ours, ref = _peft_pair(ours, ref, task_type="CAUSAL_LM", **LORA)
    assert "Linear4bit" in type(ours.get_base_model().model.layers[0].self_attn.q_proj).__name__
    loom_losses, ref_losses = _train_both(tmp_path, ours, ref, lm_rows(40, seed=7), PadCollator(), max_steps=5)
    assert loom_losses == pytest.approx(ref_losses, abs=1e-4)
    assert loom_losses[-1] < loom_losses[0]


def test_all_linear_with_lm_head_excluded_targets_what_the_reference_targets(llama_dir):
    """peft leaves the output layer out of "all-linear" only for the reference's classes; the guide's
    exclude_modules=["lm_head"] gives a loom model the same adapters."""
    import transformers

    config = dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear")
    ours = peft.get_peft_model(loom.AutoModelForCausalLM.from_pretrained(llama_dir),
                               peft.LoraConfig(**config, exclude_modules=["lm_head"]))
    ref = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), peft.LoraConfig(**config))
    assert peft.get_peft_model_state_dict(ours).keys() == peft.get_peft_model_state_dict(ref).keys()


def test_prepare_inputs_for_generation_gives_the_tokens_the_cache_has_not_seen(llama_dir):
    """peft's generation wrappers read the next step's inputs from the model (prompt learning feeds them)."""
    from loom.models.cache import DynamicCache

    model = loom.AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(5))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :3], past_key_values=cache, use_cache=True)
    step = model.prepare_inputs_for_generation(ids, past_key_values=cache, use_cache=True)
    assert step["input_ids"].tolist() == ids[:, 3:].tolist() and step["cache_position"].tolist() == [3, 4]
    with torch.no_grad():
        logits = model(**step).logits
    torch.testing.assert_close(logits, _logits(model, ids)[:, 3:], atol=1e-5, rtol=1e-5)


def test_a_lora_run_resumes_from_its_checkpoint_exactly(llama_dir, tmp_path):
    """A PeftModel's checkpoints hold its adapters only; resuming loads them (and the optimizer) back."""
    import transformers

    def run(output_dir, resume=None, max_steps=6):
        model = peft.get_peft_model(loom.AutoModelForCausalLM.from_pretrained(llama_dir),
                                    peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
        args = loom.TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                                      learning_rate=1e-2, logging_steps=1, save_steps=3, report_to="none",
                                      disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=lm_rows(24, seed=8), data_collator=PadCollator())
        trainer.train(resume_from_checkpoint=resume)
        return model, [log["loss"] for log in trainer.state.log_history if "loss" in log]

    whole, losses = run(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoint-3").glob("adapter_*")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    resumed, tail = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert tail == pytest.approx(losses, abs=1e-6)  # the first three restored from the checkpoint's history
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=name)
    # the reference's peft loads the checkpoint's adapter
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama_dir),
                                         tmp_path / "whole" / "checkpoint-6")
    ids = torch.randint(3, 99, (2, 6))
    torch.testing.assert_close(_logits(ref, ids), _logits(whole, ids), atol=1e-5, rtol=1e-5)
