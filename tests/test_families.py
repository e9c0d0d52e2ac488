"""What works for Llama works for every decoder family in the registry: greedy and beam generate token-identical to
the reference (one prompt and a left-padded batch), static-cache generate, a save the reference loads with the same
logits, built-in int8 close to fp32, the text-generation pipeline, and tp_plan="auto" on 2 processes equal to one.
Families come from the model files' MODEL_TYPES, so a new family is covered once it has a TINY config."""
from __future__ import annotations

import sys

import pytest
import torch

import loom
from loom.auto import model_table
from loom.quantization import WeightOnlyConfig
from loomtest import TINY, is_decoder_family, reference_checkpoint

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "distributed"))
import dist_helpers as H  # noqa: E402

FAMILIES = sorted(t for t, (_, heads) in model_table().items() if is_decoder_family(heads) and t in TINY)


def _ids(B=2, T=9, seed=1):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


def _padded():
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    model_type = request.param
    cls = model_table()[model_type][1]["causal-lm"].__name__
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, pad_token_id=0)
    return model_type, path, ref, getattr(loom, cls).from_pretrained(path)


def test_greedy_and_beam_generate_match_reference(family):
    _, _, ref, ours = family
    ids, mask = _padded()
    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=3, length_penalty=1.0)):
        kw.update(max_new_tokens=8, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            assert ours.generate(ids[1:], **kw).tolist() == ref.generate(ids[1:], **kw).tolist(), kw
            assert ours.generate(ids, attention_mask=mask, **kw).tolist() == \
                ref.generate(ids, attention_mask=mask, **kw).tolist(), kw


def test_static_cache_generate_equals_dynamic(family):
    _, _, _, ours = family
    ids, mask = _padded()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    assert ours.generate(ids, cache_implementation="static", **kw).tolist() == ours.generate(ids, **kw).tolist()


def test_save_loads_in_reference_with_same_logits(family, tmp_path):
    import transformers

    _, _, _, ours = family
    ours.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_int8_and_int4_are_close_to_fp32(family, bits):
    _, path, _, ours = family
    config = WeightOnlyConfig(bits=8) if bits == 8 else WeightOnlyConfig(bits=4, group_size=8)
    q = type(ours).from_pretrained(path, quantization_config=config)
    assert any(getattr(m, "_loom_quantized", False) for m in q.modules())
    ids = _ids()
    with torch.no_grad():
        a, b = q(ids).logits, ours(ids).logits
    assert (a - b).norm() / b.norm() < (0.02 if bits == 8 else 0.25)


@pytest.mark.parametrize("task,head", [("text-generation", "causal-lm"),
                                       ("text-classification", "sequence-classification")])
def test_pipelines_match_reference(family, tmp_path_factory, minilm_dir, task, head):
    import transformers

    model_type = family[0]
    heads = model_table()[model_type][1]
    if head not in heads:
        pytest.skip(f"{model_type} has no {head} head in the reference either")
    path, _ = reference_checkpoint(tmp_path_factory, model_type, heads[head].__name__, vocab_size=30522,
                                   pad_token_id=0, bos_token_id=101, eos_token_id=102, num_labels=2)
    kw = dict(max_new_tokens=5, do_sample=False) if task == "text-generation" else {}
    texts = ["the weather today", "a longer sentence about the weather"]
    # the MiniLM tokenizer, loaded by each library from its own folder (the reference picks a tokenizer class from
    # the model's model_type when the files sit beside a Qwen2 config)
    ours = loom.pipeline(task, model=str(path), tokenizer=loom.AutoTokenizer.from_pretrained(minilm_dir))(texts, **kw)
    ref = transformers.pipeline(task, model=str(path),
                                tokenizer=transformers.AutoTokenizer.from_pretrained(minilm_dir))(texts, **kw)
    flat = lambda out: [r[0] if isinstance(r, list) else r for r in out]  # noqa: E731 (generation nests a list)
    ours, ref = flat(ours), flat(ref)
    assert [r.get("generated_text") or r["label"] for r in ours] == [r.get("generated_text") or r["label"] for r in ref]
    assert [r.get("score", 0) for r in ours] == pytest.approx([r.get("score", 0) for r in ref], rel=1e-5)


@pytest.mark.timeout(400)
def test_tp_auto_on_two_processes_equals_one(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_families")
    paths = []
    for model_type in FAMILIES:
        cls = model_table()[model_type][1]["causal-lm"].__name__
        path, _ = reference_checkpoint(tmp_path_factory, model_type, cls, num_key_value_heads=2)
        paths.append(str(path))
    H.launch(2, root, "families", *paths, script="tp_families_script.py", timeout=300)
    got = torch.load(root / "tp_families.pt", weights_only=True)
    ids = _ids()
    for model_type, path in zip(FAMILIES, paths):
        ours = loom.AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            torch.testing.assert_close(got[path]["logits"], ours(ids).logits, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{model_type}: {m}")
            assert got[path]["tokens"].tolist() == ours.generate(ids, max_new_tokens=6, do_sample=False,
                                                                  pad_token_id=0).tolist(), model_type


def _bnb_shapes(model_type: str) -> dict:
    """Widths bitsandbytes' CPU 4-bit kernel needs on AVX-512 machines (in_features % 64, out_features % 32)."""
    if model_type == "gpt2":
        return dict(n_embd=64)
    out = dict(hidden_size=64, intermediate_size=128)
    out.update({k: v for k, v in dict(head_dim=16, moe_intermediate_size=64,
                                      shared_expert_intermediate_size=64).items() if k in TINY[model_type]})
    return out


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_bitsandbytes_4bit_matches_reference(tmp_path_factory, model_type):
    pytest.importorskip("bitsandbytes")
    import transformers

    cls = model_table()[model_type][1]["causal-lm"].__name__
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls, **_bnb_shapes(model_type))
    config = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    if model_type == "qwen2_moe":
        # bitsandbytes' AVX-512 4-bit kernel refuses the 1-output shared_expert_gate, in the reference too
        config["llm_int8_skip_modules"] = ["lm_head", "shared_expert_gate"]
    ours = getattr(loom, cls).from_pretrained(path, quantization_config=loom.BitsAndBytesConfig(**config))
    ref = getattr(transformers, cls).from_pretrained(path,
                                                     quantization_config=transformers.BitsAndBytesConfig(**config))
    ids = _ids()
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    if "moe" in model_type or model_type == "mixtral":
        # the routed experts' fp32 sums differ from the reference's in the last bits, and bitsandbytes' AVX-512 4-bit
        # kernel rounds its inputs to bf16, where such a bit can flip a rounding: close, not bitwise
        assert (a - b).norm() / b.norm() < 1e-2
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


HEAD_CASES = [(t, head) for t in FAMILIES for head in ("token-classification", "question-answering")
              if head in model_table()[t][1]]


@pytest.mark.parametrize("model_type,head", HEAD_CASES)
def test_token_classification_and_qa_heads_match_reference(tmp_path_factory, tmp_path, model_type, head):
    """The decoder families' token-classification and question-answering heads: the reference's checkpoint loads
    through the Auto class with equal logits and loss on a right-padded batch, and loom's save loads back there."""
    import transformers

    cls = model_table()[model_type][1][head].__name__
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, pad_token_id=0, num_labels=3)
    auto = "AutoModelForTokenClassification" if head == "token-classification" else "AutoModelForQuestionAnswering"
    ours = getattr(loom, auto).from_pretrained(path)
    assert type(ours).__name__ == cls
    ids, mask = _ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, -3:] = 0
    if head == "token-classification":
        labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(2))
        labels[0, -3:] = -100
        extra, keys = dict(labels=labels), ("loss", "logits")
    else:
        extra, keys = dict(start_positions=torch.tensor([1, 4]), end_positions=torch.tensor([3, 12])), \
            ("loss", "start_logits", "end_logits")
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask, **extra), ref(ids, attention_mask=mask, **extra)
        for key in keys:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
        ours.save_pretrained(tmp_path)
        back = getattr(transformers, cls).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(back(ids, attention_mask=mask)[keys[1]], a[keys[1]], atol=1e-5, rtol=1e-5)


def test_decoder_token_classification_pipeline_matches_reference(tmp_path_factory, minilm_dir):
    """(The reference 5.x has no question-answering pipeline any more; loom neither.)"""
    import transformers

    path, _ = reference_checkpoint(tmp_path_factory, "qwen2", "Qwen2ForTokenClassification", vocab_size=30522,
                                   pad_token_id=0, num_labels=3)
    text, task = "the weather in Paris today", "token-classification"
    ours = loom.pipeline(task, model=str(path), tokenizer=loom.AutoTokenizer.from_pretrained(minilm_dir))(text)
    ref = transformers.pipeline(task, model=str(path),
                                tokenizer=transformers.AutoTokenizer.from_pretrained(minilm_dir))(text)
    assert ref
    for a, b in zip(ours, ref, strict=True):
        assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)
