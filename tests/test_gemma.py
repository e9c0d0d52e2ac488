"""Gemma 1/2/3 features against the reference where they change the numbers. tests/test_families.py and
tests/test_model_parity.py cover the families on their TINY configs; there attention is nearly uniform, so soft-caps,
norm weights and RoPE bases barely move the logits. Here every weight gets a large random offset, so each feature
matters, and each test shows that its key counts: the wrong value is far from the reference, the right one exact."""
from __future__ import annotations

import json

import pytest
import torch

import loom
from loom.configuration import ConfigFieldError
from loomtest import TINY, gemma_like_tokenizer, reference_checkpoint

CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# config keys with a value that must change the logits (so a loom ignoring the key would fail the parity check)
WRONG = {
    "gemma": dict(hidden_act="silu"),
    "gemma2": dict(attn_logit_softcapping=None, final_logit_softcapping=None, query_pre_attn_scalar=16,
                   sliding_window=64, hidden_activation="silu"),
    "gemma3_text": dict(sliding_window=64, query_pre_attn_scalar=16, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e6},  # the global base on the local layers
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),  # no linear scaling on the global ones
}


def _ids(B=2, T=12, seed=1):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


def sharp_checkpoint(path, model_type: str, **overrides):
    """A reference model whose every weight (norms included, which start at zero) is offset by N(0, 0.3)."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **{**TINY[model_type], "pad_token_id": 0, **overrides})
    torch.manual_seed(0)
    ref = getattr(transformers, CLASSES[model_type])(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ref.save_pretrained(path)
    return ref


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_sharp_checkpoint_matches_reference_and_each_key_counts(tmp_path, model_type):
    ref = sharp_checkpoint(tmp_path, model_type)
    cls = getattr(loom, CLASSES[model_type])
    ours = cls.from_pretrained(tmp_path)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[0, 4:], want[0, 4:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
        out = ours(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 12):
            out = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                       use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1)[1], want[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.cat(steps, 1)[0, 4:], want[0, 4:], atol=1e-4, rtol=1e-4)
        for key, value in WRONG[model_type].items():
            off = cls.from_pretrained(tmp_path, **{key: value})(ids, attention_mask=mask).logits
            assert (off[1] - want[1]).abs().max() > 0.05, f"{key}={value!r} does not change the logits"
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
        assert ours.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()


def test_gemma_reads_hidden_act_gelu_as_tanh_gelu(tmp_path):
    """The first Gemma configs say hidden_act "gelu"; the reference runs the tanh approximation for it."""
    import transformers

    sharp_checkpoint(tmp_path, "gemma")
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "hidden_act": "gelu"}))
    ids = _ids()
    with torch.no_grad():
        want = transformers.GemmaForCausalLM.from_pretrained(tmp_path)(ids).logits
        got = loom.GemmaForCausalLM.from_pretrained(tmp_path)
        assert got.config.hidden_act == "gelu_pytorch_tanh"
        torch.testing.assert_close(got(ids).logits, want, atol=1e-4, rtol=1e-4)
        exact = loom.GemmaForCausalLM.from_pretrained(tmp_path)
        exact.model.layers[0].mlp.act_fn = torch.nn.GELU()  # what "gelu" would mean elsewhere
        assert (exact(ids).logits - want).abs().max() > 1e-3


def test_gemma2_attention_defaults_to_eager_as_the_reference(tmp_path):
    """Without soft-capping, eager and SDPA differ only on padding queries (eager averages the values, SDPA gives
    zeros); the reference runs Gemma 2 eagerly, so must loom for the padding positions' logits to agree. Gemma 3's
    default is SDPA in both."""
    import transformers

    ref = sharp_checkpoint(tmp_path, "gemma2", attn_logit_softcapping=None)
    ours = loom.Gemma2ForCausalLM.from_pretrained(tmp_path)
    assert ours.config._attn_implementation == ref.config._attn_implementation == "eager"
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, want, atol=1e-4, rtol=1e-4)
        sdpa = loom.Gemma2ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
        assert (sdpa(ids, attention_mask=mask).logits[0, :4] - want[0, :4]).abs().max() > 0.05
    config = dict(TINY["gemma3_text"])
    assert loom.Gemma3TextConfig(**config)._attn_implementation is None  # PreTrainedModel picks "sdpa"
    ref3 = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config))
    assert loom.Gemma3ForCausalLM(loom.Gemma3TextConfig(**config)).config._attn_implementation == \
        ref3.config._attn_implementation == "sdpa"


def test_bf16_embedding_scale_is_rounded_like_the_reference(tmp_path, monkeypatch):
    """The scale sqrt(hidden) is rounded to bfloat16 before it multiplies, as the reference does: the embeddings are
    its bits, and so are the logits on torch's ops (loom's kernels off). With the kernels on, bfloat16 products and
    attention round differently per instruction-set level (a last-bit difference that grows to one bfloat16 step of
    the logits, ~0.06 at 8-16): there loom's logits are as close to the float32 model's as the reference's are."""
    import transformers
    from loomtest import kernels_off_for

    sharp_checkpoint(tmp_path, "gemma")
    ref = transformers.GemmaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = loom.GemmaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    exact = loom.GemmaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        want = ref.model.embed_tokens(ids)
        assert torch.equal(ours.model.embed(ids), want)
        assert not torch.equal(ours.model.embed_tokens(ids) * 32 ** 0.5, want)  # the unrounded scale differs
        logits, truth = ref(ids).logits, exact(ids).logits
        got = ours(ids).logits
        torch.testing.assert_close(got, logits, atol=0.07, rtol=2e-2)
        assert (got.float() - truth).abs().mean() <= (logits.float() - truth).abs().mean() * 1.05
        kernels_off_for(monkeypatch)
        assert torch.equal(ours(ids).logits, logits)
        monkeypatch.setattr(ours.model, "embed", lambda input_ids: ours.model.embed_tokens(input_ids) * 32 ** 0.5)
        assert not torch.equal(ours(ids).logits, logits)


def test_gemma3_legacy_config_keys(tmp_path):
    """Configs written before 5.x: rope_theta, rope_local_base_freq, rope_scaling and sliding_window_pattern instead
    of rope_parameters and layer_types. loom folds them as the reference does and saves what the reference saves."""
    import transformers

    ref = sharp_checkpoint(tmp_path, "gemma3_text", num_hidden_layers=3)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        raw.pop(key, None)
    raw.update(rope_theta=1e6, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
               sliding_window_pattern=2)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ref_legacy = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path).eval()
    ours = loom.Gemma3ForCausalLM.from_pretrained(tmp_path)
    assert ours.config.layer_types == ref_legacy.config.layer_types == ref.config.layer_types
    assert ours.config.rope_parameters == ref_legacy.config.rope_parameters
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    saved = ours.config.to_dict()
    assert not {"rope_theta", "rope_local_base_freq", "rope_scaling"} & set(saved)
    for layers, pattern in ((8, None), (7, 3)):
        extra = {} if pattern is None else {"sliding_window_pattern": pattern}
        assert loom.Gemma3TextConfig(num_hidden_layers=layers, **extra).layer_types == \
            transformers.Gemma3TextConfig(num_hidden_layers=layers, **extra).layer_types


@pytest.mark.parametrize("name", ["Gemma2Config", "Gemma3TextConfig"])
def test_layer_types_of_the_wrong_length_name_the_key_and_file(tmp_path, name):
    with pytest.raises(ConfigFieldError, match="layer_types=.*num_hidden_layers=2"):
        getattr(loom, name)(num_hidden_layers=2, layer_types=["full_attention"])
    model_type = getattr(loom, name).model_type
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 3,
                                                      "layer_types": ["sliding_attention", "global"]}))
    with pytest.raises(ConfigFieldError, match=f"{tmp_path}.*layer_types"):
        loom.AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type,key", [("gemma", "hidden_act"), ("gemma2", "hidden_activation"),
                                            ("gemma3_text", "hidden_activation")])
def test_unsupported_activation_names_the_key_and_file(tmp_path, model_type, key):
    sharp_checkpoint(tmp_path, model_type)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, key: "swiglu"}))
    with pytest.raises(ValueError, match=f"{tmp_path}: config {key}='swiglu' is not supported for {model_type}"):
        loom.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_refused_gemma_settings_say_which_key(tmp_path):
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):  # only Gemma 3 runs as an encoder
        loom.Gemma2ForCausalLM(loom.Gemma2Config(**TINY["gemma2"], use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="sliding_attention layers but sliding_window is null"):
        loom.Gemma2Model(loom.Gemma2Config(**{**TINY["gemma2"], "sliding_window": None}))


GLOBAL_ROPES = {  # Gemma 3's global layers with each scaled RoPE type, its sliding layers with the local base
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                 "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.1, 2.5],
                 "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 19.0]},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope", sorted(GLOBAL_ROPES))
def test_gemma3_per_layer_type_rope_beyond_the_original_context(tmp_path, rope):
    ref = sharp_checkpoint(tmp_path, "gemma3_text", max_position_embeddings=24, rope_scaling=None,
                           rope_parameters={"full_attention": {**GLOBAL_ROPES[rope], "rope_theta": 10000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    ours = loom.Gemma3ForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        for T in (12, 40):  # under and over the original length (dynamic resets, longrope switches)
            torch.testing.assert_close(ours(_ids(T=T)).logits, ref(_ids(T=T)).logits, atol=1e-4, rtol=1e-4)
        ids = _ids(B=1, T=10, seed=2)
        kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)
        a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
        assert a.sequences.tolist() == b.sequences.tolist()
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=1e-4)


def test_hub_generation_config_with_hybrid_cache_generates(tmp_path):
    """Gemma 2/3 checkpoints ship generation_config.json with cache_implementation "hybrid" (the old sliding-window
    cache); the reference now runs its default cache for it, and so does loom instead of refusing the name."""
    ref = sharp_checkpoint(tmp_path, "gemma3_text")
    raw = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**raw, "cache_implementation": "hybrid"}))
    ours = loom.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert ours.generation_config.cache_implementation == "hybrid"
    ids = _ids(B=1, T=6)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert ours.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()
    assert ours.generate(ids, cache_implementation="hybrid", **kw).tolist() == ref.generate(ids, **kw).tolist()


# -- EmbeddingGemma: Gemma 3 with use_bidirectional_attention ---------------------------------------------------------
def test_bidirectional_gemma3_matches_reference_and_is_no_decoder(tmp_path_factory):
    """Every layer attends both ways; sliding layers to keys under sliding_window // 2 + 1 positions away (6 -> 4,
    within reach of 12 tokens), on a right-padded batch. It keeps no cache, so generate gets a clear error."""
    path, ref = reference_checkpoint(tmp_path_factory, "gemma3_text", "Gemma3TextModel", sliding_window=6,
                                     use_bidirectional_attention=True, pad_token_id=0)
    ours = loom.AutoModel.from_pretrained(path)
    assert ours.windows == [4, None]
    ids, mask = _ids(), torch.ones(2, 12, dtype=torch.long)
    mask[0, -4:] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).last_hidden_state, ref(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(a[0, :8], b[0, :8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
        causal = loom.AutoModel.from_pretrained(path, use_bidirectional_attention=False)
        assert not torch.allclose(causal(ids).last_hidden_state[:, :-1], ours(ids).last_hidden_state[:, :-1])
    lm = loom.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="attends in both directions"):
        lm.generate(ids, max_new_tokens=2)


def test_embeddinggemma_folder_matches_sentence_transformers(tmp_path_factory):
    """EmbeddingGemma's sentence-transformers layout: Transformer -> mean Pooling -> Dense -> Dense -> Normalize."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import models as modules
    path, _ = reference_checkpoint(tmp_path_factory, "gemma3_text", "Gemma3TextModel", vocab_size=300,
                                   use_bidirectional_attention=True, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    gemma_like_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    torch.manual_seed(3)
    encoder = modules.Transformer(str(path))
    dense = [modules.Dense(32, 48, bias=False, activation_function=torch.nn.Identity()),
             modules.Dense(48, 16, bias=False, activation_function=torch.nn.Identity())]
    model = st.SentenceTransformer(modules=[encoder, modules.Pooling(32, "mean"), *dense, modules.Normalize()],
                                   device="cpu")
    folder = tmp_path_factory.mktemp("embeddinggemma")
    model.save(str(folder))
    texts = ["the quick brown fox", "hello world, a b c and the lazy dog jumps over", "a"]
    expected = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    ours = loom.pipeline("feature-extraction", model=str(folder))(texts, pooling="auto", return_tensors=True)
    torch.testing.assert_close(torch.stack(ours), expected.float(), atol=1e-5, rtol=0)
