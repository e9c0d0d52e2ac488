"""Sentence embeddings from every encoder family against sentence-transformers' `encode` on the same folder: a tiny
random checkpoint of each family saved by the reference, the real MiniLM tokenizer beside it, and a
sentence-transformers layout (mean pooling, Normalize, max_seq_length 48). Texts of very different lengths (an
empty one, one cut at max_seq_length) run in mixed-length batches, so padding, the per-sequence position terms
(RoBERTa's and MPNet's positions, MPNet's relative bias, DeBERTa's c2p/p2c, ModernBERT's local window) and every
pooling mode are checked where batching could change them; also a single text and an empty list."""
from __future__ import annotations

import json

import pytest
import torch

import loom
from loom.auto import model_table
from loomtest import TINY

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # noqa: E402

FAMILIES = ("bert", "roberta", "xlm-roberta", "mpnet", "deberta-v2", "modernbert", "distilbert", "electra")
MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
MAX_SEQ = 48
WORDS = "river city music energy garden window morning quickly carefully history science market data".split()
# 1 to 80 words: the longest is cut at MAX_SEQ tokens; the empty text is [CLS] [SEP] alone
TEXTS = ["", " ".join(WORDS[i % 13] for i in range(80)), "hello", "Le chat dort sur le canapé.",
         " ".join(WORDS[i % 7] for i in range(30)), "a b", " ".join(WORDS[::-1] * 2), "Stocks fell sharply."]


@pytest.fixture(scope="module", params=FAMILIES)
def family_folder(request, tmp_path_factory, minilm_dir):
    model_type = request.param
    config = {**TINY[model_type], "vocab_size": 30522, "max_position_embeddings": 80}
    if "pad_token_id" in config or model_type in ("roberta", "xlm-roberta"):
        config["pad_token_id"] = 0  # the MiniLM tokenizer's; RoBERTa counts positions from it
    import transformers

    torch.manual_seed(0)
    cls = model_table()[model_type][1]["base"].__name__
    ref = getattr(transformers, cls)(transformers.AutoConfig.for_model(model_type, **config)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # every parameter random: a fresh model's zero biases and unit norms hide wrong keys
        for name, p in ref.named_parameters():
            base = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp(f"st_{model_type}")
    ref.save_pretrained(folder)
    for item in minilm_dir.iterdir():
        if item.name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (folder / item.name).symlink_to(item)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "mean"}))
    (folder / "2_Normalize").mkdir()
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ}))
    return model_type, folder


def _loom(folder, texts, batch_size=3, **kwargs):
    out = loom.pipeline("feature-extraction", model=str(folder))(texts, return_tensors=True, batch_size=batch_size,
                                                                  **kwargs)
    return torch.stack(out) if isinstance(out, list) else out


def test_folder_embeddings_match_sentence_transformers(family_folder):
    model_type, folder = family_folder
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, batch_size=3, convert_to_tensor=True)
    got = _loom(folder, TEXTS, pooling="auto")
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{model_type}: {m}")
    # batching changes nothing: one text at a time, and all in one padded batch, give the same vectors
    torch.testing.assert_close(_loom(folder, TEXTS, pooling="auto", batch_size=1), got, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_loom(folder, TEXTS, pooling="auto", batch_size=len(TEXTS)), got, atol=1e-5,
                               rtol=1e-5)


def test_every_pooling_mode_matches_sentence_transformers(family_folder):
    model_type, folder = family_folder
    encoder = Transformer(str(folder), max_seq_length=MAX_SEQ)
    for mode in MODES:
        st = SentenceTransformer(modules=[encoder, Pooling(32, pooling_mode=mode)], device="cpu")
        want = st.encode(TEXTS, batch_size=3, convert_to_tensor=True).float()
        got = _loom(folder, TEXTS, pooling=mode, max_length=MAX_SEQ)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{model_type} {mode}: {m}")


def test_single_text_and_empty_list(family_folder):
    model_type, folder = family_folder
    st = SentenceTransformer(str(folder), device="cpu")
    one = _loom(folder, TEXTS[1], pooling="auto")
    assert one.shape == (32,)
    torch.testing.assert_close(one, st.encode(TEXTS[1], convert_to_tensor=True).float(), atol=1e-5, rtol=1e-5)
    assert loom.pipeline("feature-extraction", model=str(folder))([], pooling="auto") == []
    assert len(st.encode([])) == 0
