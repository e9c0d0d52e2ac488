"""Attention implementations ("sdpa", "eager"), output_attentions, and queries with nothing to attend to, each
against the reference on tiny checkpoints it writes (fp32)."""
from __future__ import annotations

import json
import re

import pytest
import torch

import loom
from loomtest import reference_checkpoint

FAMILIES = [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
            ("gpt2", "GPT2LMHeadModel"), ("bert", "BertModel")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(model_type, cls):
        if cls not in cache:
            cache[cls] = reference_checkpoint(tmp_path_factory, model_type, cls, pad_token_id=0)
        return cache[cls]
    return get


def _batch(T=9, pad=3):
    ids = torch.randint(3, 99, (2, T), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding on row 0
    return ids, mask


def _main(out):
    return out.logits if "logits" in out else out.last_hidden_state


@pytest.mark.parametrize("name,words", [
    ("no_such_impl", "loom implements 'sdpa'"), ("flash_attention_2", "flash-attn package"),
    ("flash_attention_3", "flash-attn package"), ("flex_attention", "flex_attention"), ("paged|eager", "paged")])
def test_unsupported_attn_implementation_is_an_error(checkpoints, tmp_path, name, words):
    path, _ = checkpoints("llama", "LlamaForCausalLM")
    for make in (lambda: loom.LlamaForCausalLM.from_pretrained(path, attn_implementation=name),
                 lambda: loom.AutoModelForCausalLM.from_config(loom.AutoConfig.from_pretrained(path),
                                                               attn_implementation=name)):
        with pytest.raises(ValueError, match=re.escape(f'Specified `attn_implementation="{name}"` is not supported') + f".*{words}"):
            make()
    data = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "attn_implementation": name}))
    with pytest.raises(ValueError, match=re.escape(f'Specified `attn_implementation="{name}"` is not supported')):
        loom.LlamaForCausalLM(loom.AutoConfig.from_pretrained(tmp_path))


def test_attn_implementation_from_config_json(checkpoints, tmp_path):
    path, _ = checkpoints("llama", "LlamaForCausalLM")
    data = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "attn_implementation": "eager"}))
    config = loom.AutoConfig.from_pretrained(tmp_path)
    assert config._attn_implementation == "eager"
    assert "attn_implementation" not in config.to_dict()  # a load setting, not saved (as the reference)
    # the internal key is not read from config.json, as the reference: old hub configs carry stale values
    (tmp_path / "config.json").write_text(json.dumps({**data, "_attn_implementation": "flash_attention_2"}))
    assert loom.LlamaForCausalLM(loom.AutoConfig.from_pretrained(tmp_path)).config._attn_implementation == "sdpa"


def test_output_attentions_in_cached_decode(checkpoints):
    """A cached decode step returns that step's probabilities over every key so far."""
    import transformers

    path, _ = checkpoints("llama", "LlamaForCausalLM")
    ref = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ours = loom.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager")
    ids, mask = _batch()
    with torch.no_grad():
        a = ours(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        b = ref(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        a = ours(ids[:, -1:], attention_mask=mask, past_key_values=a.past_key_values, output_attentions=True)
        b = ref(ids[:, -1:], attention_mask=mask, past_key_values=b.past_key_values, output_attentions=True)
    for x, y in zip(a.attentions, b.attentions, strict=True):
        assert x.shape == (2, 4, 1, ids.shape[1])
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_output_attentions_under_sdpa(checkpoints):
    """Asked in a forward, loom computes them eagerly under "sdpa" too (the reference's SDPA returns an empty tuple
    and warns). Asked in the config, sdpa is refused, as in the reference, and load-time output_attentions picks
    eager."""
    import transformers

    path, ref = checkpoints("llama", "LlamaForCausalLM")
    ids, mask = _batch()
    with torch.no_grad():
        assert ref(ids, attention_mask=mask, output_attentions=True).attentions == ()  # the reference's choice
        got = loom.LlamaForCausalLM.from_pretrained(path)(ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == 2 and got.attentions[0].shape == (2, 4, 9, 9)
    assert loom.LlamaForCausalLM.from_pretrained(path, output_attentions=True).config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="config output_attentions=True.*attn_implementation=\"eager\""):
        loom.LlamaForCausalLM.from_pretrained(path, output_attentions=True, attn_implementation="sdpa")
    with pytest.raises(Exception, match="output_attentions.*sdpa"):  # the reference refuses the same pair
        transformers.LlamaForCausalLM.from_pretrained(path, output_attentions=True, attn_implementation="sdpa")
    model = loom.LlamaForCausalLM.from_pretrained(path, output_attentions=True)
    with pytest.raises(ValueError, match="config output_attentions=True"):
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("name,words", [
    ("bogus", "loom implements 'sdpa'"), ("flash_attention_2", "flash-attn package"),
    ("flex_attention", "flex_attention"), (None, "loom implements")])
def test_set_attn_implementation_refuses_what_loom_lacks(checkpoints, name, words):
    path, _ = checkpoints("gpt2", "GPT2LMHeadModel")
    model = loom.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager")
    if name is None:  # a dict may only name the model itself: loom's models have no sub-configs
        with pytest.raises(ValueError, match=r"set_attn_implementation\(\{'text_config': 'sdpa'\}\).*sub-configs"):
            model.set_attn_implementation({"text_config": "sdpa"})
        model.set_attn_implementation({"": "sdpa"})
        assert model.config._attn_implementation == "sdpa"
        return
    with pytest.raises(ValueError, match=re.escape(f'Specified `attn_implementation="{name}"` is not supported') + f".*{words}.*'sdpa' or 'eager'"):
        model.set_attn_implementation(name)
    assert model.config._attn_implementation == "eager"  # a refused name leaves the model as it was


@pytest.mark.parametrize("model_type,cls", FAMILIES)
def test_fully_masked_row_matches_reference(checkpoints, model_type, cls):
    """A row whose attention_mask is all zeros: the reference's SDPA gives its queries zero attention output."""
    path, ref = checkpoints(model_type, cls)
    ours = getattr(loom, cls).from_pretrained(path)
    ids, mask = _batch(T=6)
    mask[0] = 0
    with torch.no_grad():
        torch.testing.assert_close(_main(ours(ids, attention_mask=mask)), _main(ref(ids, attention_mask=mask)),
                                   atol=1e-5, rtol=1e-5)
        if model_type == "bert":
            return
        a = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        b = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_fully_masked_single_query_matches_reference(checkpoints):
    """One-token prompts, one of them masked: the prefill is a single query, which loom's decode kernel serves."""
    path, ref = checkpoints("llama", "LlamaForCausalLM")
    ours = loom.LlamaForCausalLM.from_pretrained(path)
    ids, mask = torch.tensor([[5], [7]]), torch.tensor([[0], [1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
        a = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        b = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_generate_returns_each_steps_attentions(checkpoints, impl, beams, one_thread):
    """generate(output_attentions=True, return_dict_in_generate=True): per generated token, one tuple of per-layer
    probabilities (the prompt's, then one query per step), equal to the reference's (eager) for a left-padded batch,
    greedy and beam search."""
    import transformers

    path, _ = checkpoints("qwen2", "Qwen2ForCausalLM")
    ref = transformers.Qwen2ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ours = loom.Qwen2ForCausalLM.from_pretrained(path, attn_implementation=impl)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=beams, pad_token_id=0,
              eos_token_id=None, output_attentions=True, return_dict_in_generate=True)
    with torch.no_grad():
        a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert a.sequences.tolist() == b.sequences.tolist()
    assert len(a.attentions) == len(b.attentions) == 4
    for step, (x, y) in enumerate(zip(a.attentions, b.attentions)):
        assert len(x) == len(y) == 2
        for p, q in zip(x, y):
            assert p.shape == q.shape == (2 * beams, 4, 9 if step == 0 else 1, 9 + step)
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
    plain = ours.generate(ids, **{**kw, "output_attentions": False})
    assert plain.attentions is None and plain.sequences.tolist() == a.sequences.tolist()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_output_attentions_with_gradient_checkpointing(impl, one_thread):
    """The backward's recomputation of a checkpointed layer takes the path its forward took (eager while recording,
    under "sdpa" too): the gradients equal those of a run without checkpointing or attentions."""
    from loomtest import TINY

    torch.manual_seed(0)
    model = loom.LlamaForCausalLM(loom.LlamaConfig(**TINY["llama"], attn_implementation=impl)).train()
    ids, mask = _batch()
    grads = []
    for checkpointing, attentions in ((False, False), (True, True)):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(ids, attention_mask=mask, labels=ids, output_attentions=attentions)
        out.loss.backward()
        assert (out.attentions is not None) == attentions
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_recording_is_per_thread_and_from_config_picks_eager(checkpoints, monkeypatch):
    """A forward recording its attentions in one thread leaves another thread's SDPA forward alone (SDPA runs there
    for each layer); from_config's attn_implementation sets the model's config and not the caller's."""
    import threading

    sdpa_threads = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa_threads.append(threading.current_thread().name) or sdpa(*a, **kw))

    path, _ = checkpoints("llama", "LlamaForCausalLM")
    config = loom.AutoConfig.from_pretrained(path)
    eager = loom.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert (eager.config._attn_implementation, config._attn_implementation) == ("eager", None)
    model = loom.LlamaForCausalLM.from_pretrained(path)
    ids, mask = _batch()
    seen = {}
    original = model.model.layers[0].self_attn.forward

    def in_other_thread():
        with torch.no_grad():
            seen["other"] = model(ids, attention_mask=mask)

    def first_layer(*args, **kwargs):  # runs inside the recording forward: start the other one meanwhile
        if "started" not in seen:
            seen["started"] = True
            worker = threading.Thread(target=in_other_thread, name="other")
            worker.start()
            worker.join()
        return original(*args, **kwargs)

    model.model.layers[0].self_attn.forward = first_layer
    with torch.no_grad():
        recorded = model(ids, attention_mask=mask, output_attentions=True)
    assert len(recorded.attentions) == 2 and seen["other"].get("attentions") is None
    assert sdpa_threads == ["other", "other"]
    torch.testing.assert_close(seen["other"].logits, recorded.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,cls", FAMILIES)
def test_declared_attention_support_is_what_the_model_accepts(checkpoints, model_type, cls):
    """The reference's model tests read `_supports_sdpa` / `_supports_flash_attn` / `_supports_flex_attn` as the
    contract; each flag says whether `set_attn_implementation` takes that name."""
    import transformers

    path, _ = checkpoints(model_type, cls)
    model = getattr(loom, cls).from_pretrained(path, attn_implementation="eager")
    for flag, name in (("_supports_sdpa", "sdpa"), ("_supports_flash_attn", "flash_attention_2"),
                       ("_supports_flex_attn", "flex_attention")):
        assert hasattr(transformers.PreTrainedModel, flag)  # the reference's name for it
        if getattr(type(model), flag):
            model.set_attn_implementation(name)
            assert model.config._attn_implementation == name
        else:
            with pytest.raises(ValueError, match=re.escape(f'Specified `attn_implementation="{name}"` is not supported')):
                model.set_attn_implementation(name)
    assert type(model)._supports_attention_backend is False and type(model)._no_split_modules is not None
