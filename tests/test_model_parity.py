"""Every model class against the reference on tiny random checkpoints: logits, loss, padding, cached decode."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.auto import model_table
from loomtest import TINY, check_padded_and_generate, is_decoder_family, reference_checkpoint

def _heads(head: str, causal: bool = True) -> list[tuple[str, str]]:
    """(model_type, class name) of every family with `head`, from the model files' MODEL_TYPES tables."""
    return [(t, heads[head].__name__) for t, (_, heads) in sorted(model_table().items())
            if head in heads and is_decoder_family(heads) == causal]


DECODERS = _heads("causal-lm")
ENCODER_HEADS = [name for t, name in _heads("base", causal=False) + _heads("masked-lm", causal=False)
                 + _heads("sequence-classification", causal=False) + _heads("token-classification", causal=False)
                 + _heads("question-answering", causal=False) if t == "bert"]
SEQ_CLS = _heads("sequence-classification")
BASES = _heads("base")


def test_every_family_has_a_tiny_test_config():
    assert {t for t in model_table() if t != "vit"} <= set(TINY)


def _ids(B=2, T=12, vocab=99, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


def _first_tensor(out):
    for key in ("logits", "last_hidden_state", "start_logits"):
        if key in out:
            return out[key]
    raise AssertionError(f"no tensor output in {list(out)}")


@pytest.mark.parametrize("model_type,cls", DECODERS + BASES)
def test_decoder_parity_plain_and_padded(tmp_path_factory, model_type, cls):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, pad_token_id=0)
    ours = getattr(loom, cls).from_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_first_tensor(ours(ids)), _first_tensor(ref(ids)), atol=1e-4, rtol=1e-4)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding on row 0
        a, b = _first_tensor(ours(ids, attention_mask=mask)), _first_tensor(ref(ids, attention_mask=mask))
        torch.testing.assert_close(a[0, 4:], b[0, 4:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type,cls", DECODERS)
def test_causal_lm_loss_and_cached_decode(tmp_path_factory, model_type, cls):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls)
    ours = getattr(loom, cls).from_pretrained(path)
    ids = _ids(T=10)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=labels).loss, ref(ids, labels=labels).loss, atol=1e-5, rtol=1e-5)
        full = ours(ids).logits
        out = ours(ids[:, :7], use_cache=True)
        logits = [out.logits]
        cache = out.past_key_values
        for t in range(7, 10):
            out = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", ENCODER_HEADS)
def test_bert_heads_parity(tmp_path_factory, cls):
    path, ref = reference_checkpoint(tmp_path_factory, "bert", cls, num_labels=2 if "Question" in cls else 3)
    ours = getattr(loom, cls).from_pretrained(path)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask, token_type_ids=types), ref(ids, attention_mask=mask, token_type_ids=types)
        for key in b.keys():
            if key in ("hidden_states", "attentions", "past_key_values"):
                continue
            if cls in ("BertModel",) or key in ("pooler_output",) or cls == "BertForSequenceClassification":
                torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
            else:  # per-token outputs: compare the real tokens
                torch.testing.assert_close(a[key][0], b[key][0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(a[key][1, :8], b[key][1, :8], atol=1e-4, rtol=1e-4)


def test_bert_losses(tmp_path_factory):
    ids = _ids()
    for cls, kwargs in [("BertForMaskedLM", dict(labels=torch.where(ids % 3 == 0, ids, -100))),
                        ("BertForSequenceClassification", dict(labels=torch.tensor([0, 2]))),
                        ("BertForTokenClassification", dict(labels=ids % 3)),
                        ("BertForQuestionAnswering", dict(start_positions=torch.tensor([1, 3]),
                                                          end_positions=torch.tensor([4, 40])))]:
        path, ref = reference_checkpoint(tmp_path_factory, "bert", cls, num_labels=2 if "Question" in cls else 3)
        ours = getattr(loom, cls).from_pretrained(path)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids, **kwargs).loss, ref(ids, **kwargs).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,cls", SEQ_CLS)
def test_decoder_sequence_classification(tmp_path_factory, model_type, cls):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, num_labels=3, pad_token_id=0)
    ours = getattr(loom, cls).from_pretrained(path)
    ids = _ids()
    ids[0, 9:] = 0  # right padding
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        a, b = ours(ids, labels=labels), ref(ids, labels=labels)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


def test_hidden_states_match(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM")
    ours = loom.LlamaForCausalLM.from_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        a, b = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_llama_rope_scaling(tmp_path_factory, rope):
    path, ref = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM",
                                     rope_parameters={**rope, "rope_theta": 500000.0})
    ours = loom.LlamaForCausalLM.from_pretrained(path)
    ids = _ids(T=40)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_llama(tmp_path_factory):
    path, ref = reference_checkpoint(tmp_path_factory, "llama", "LlamaForCausalLM", tie_word_embeddings=True)
    ours = loom.LlamaForCausalLM.from_pretrained(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_minilm_real_checkpoint(minilm_dir):
    import transformers

    sentences = ["A man is eating food.", "Ünïcödé àccents and CJK 漢字 with emoji 🙂", "short",
                 "The quick brown fox jumps over the lazy dog " * 6]
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(sentences, padding=True, return_tensors="pt")
    ref = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    ours = loom.AutoModel.from_pretrained(minilm_dir)
    with torch.no_grad():
        a, b = ours(**batch).last_hidden_state, ref(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type,cls", [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_sliding_window_on_some_layers(tmp_path_factory, model_type, cls):
    """use_sliding_window with max_window_layers (and an explicit layer_types) windows only those layers."""
    for extra in (dict(max_window_layers=1), dict(layer_types=["sliding_attention", "full_attention",
                                                                 "sliding_attention"])):
        path, ref = reference_checkpoint(tmp_path_factory, model_type, cls, num_hidden_layers=3,
                                         use_sliding_window=True, sliding_window=3, pad_token_id=0, **extra)
        ours = getattr(loom, cls).from_pretrained(path)
        assert ours.model.windows == [3 if t == "sliding_attention" else None for t in ref.config.layer_types]
        ids = _ids(T=14)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        check_padded_and_generate(ours, ref, ids, mask, new_tokens=10)


def test_bad_layer_types_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="layer_types"):
        loom.Qwen2Config(num_hidden_layers=2, layer_types=["full_attention"])
    with pytest.raises(ValueError, match="layer_types"):
        loom.Qwen3Config(num_hidden_layers=1, layer_types=["local"])
