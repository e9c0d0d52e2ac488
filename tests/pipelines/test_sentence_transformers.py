"""Sentence embeddings and rerankers from sentence-transformers folders, against sentence-transformers itself.

Each folder is the real all-MiniLM-L6-v2 with its sentence-transformers files rewritten (weights linked, not copied),
so loom and `SentenceTransformer(folder).encode` read identical files; one folder is written by
`SentenceTransformer.save` itself."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import loom

# sentence-transformers 6.0.1 declares huggingface-hub<2 while transformers 5.25 (the oracle) needs >=2.4, so
# `./run setup` installs it beside them with --no-deps (its scikit-learn and scipy come with the dev extras).
import sentence_transformers as st  # noqa: E402

TEXTS = ["A man is eating food.", "Stocks fell sharply on Monday after the central bank raised rates again.",
         "A dog", "Le chat dort sur le canapé, et personne ne veut le réveiller avant midi."]
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def st_folder(tmp_path, minilm_dir, pooling: dict, normalize: bool = True, st_config: dict | None = None,
              bert_config: dict | None = None, extra_modules: tuple = ()):
    """A sentence-transformers folder over the MiniLM weights with the given Pooling config."""
    folder = tmp_path / "st"
    folder.mkdir()
    for item in minilm_dir.iterdir():
        if item.is_file() and item.name not in ST_FILES:
            (folder / item.name).symlink_to(item)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **pooling}))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    modules += list(extra_modules)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps(bert_config or {"max_seq_length": 256}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config or {}))
    return folder


def reference_embeddings(folder, texts, **kwargs) -> torch.Tensor:
    model = st.SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, convert_to_tensor=True, batch_size=3, **kwargs).float()


def loom_embeddings(folder, texts, **kwargs) -> torch.Tensor:
    extractor = loom.pipeline("feature-extraction", model=str(folder))
    return torch.stack(extractor(texts, pooling="auto", return_tensors=True, batch_size=3, **kwargs))


MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
LEGACY_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
               "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
               "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout,normalize", [("6.x", False), ("legacy", True)])
def test_each_pooling_mode_matches_sentence_transformers(tmp_path, minilm_dir, mode, layout, normalize):
    """Both Pooling layouts (6.x's "pooling_mode" and the older booleans), every mode, with and without Normalize."""
    pooling = {"pooling_mode": mode} if layout == "6.x" else {key: key == LEGACY_KEYS[mode] for key in
                                                              LEGACY_KEYS.values()}
    folder = st_folder(tmp_path, minilm_dir, pooling, normalize=normalize)
    expected = reference_embeddings(folder, TEXTS)
    torch.testing.assert_close(loom_embeddings(folder, TEXTS), expected, atol=1e-5, rtol=0)


def test_several_modes_are_concatenated_in_sentence_transformers_order(tmp_path, minilm_dir):
    folder = st_folder(tmp_path, minilm_dir, {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True})
    expected = reference_embeddings(folder, TEXTS)
    assert expected.shape == (len(TEXTS), 768)
    torch.testing.assert_close(loom_embeddings(folder, TEXTS), expected, atol=1e-5, rtol=0)


def test_folder_saved_by_sentence_transformers_6(tmp_path, minilm_dir):
    """`SentenceTransformer.save` writes the 6.x layout (module paths, "pooling_mode", max length in the tokenizer
    config): it used to fail with "found none"."""
    st.SentenceTransformer(str(minilm_dir), device="cpu").save(str(tmp_path / "saved"))
    pooling = json.loads((tmp_path / "saved" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "mean" and "pooling_mode_mean_tokens" not in pooling
    texts = TEXTS + [" ".join(["word"] * 600)]
    torch.testing.assert_close(loom_embeddings(tmp_path / "saved", texts),
                               reference_embeddings(tmp_path / "saved", texts), atol=1e-5, rtol=0)


def test_max_seq_length_cuts_where_sentence_transformers_cuts(tmp_path, minilm_dir):
    """A 600-word text is cut at sentence_bert_config.json's max_seq_length (256 for MiniLM), not at 512."""
    long_text = " ".join(f"word{i % 50}" for i in range(600))
    folder = st_folder(tmp_path, minilm_dir, {"pooling_mode": "mean"}, bert_config={"max_seq_length": 100})
    ours = loom_embeddings(folder, [long_text, "short"])
    torch.testing.assert_close(ours, reference_embeddings(folder, [long_text, "short"]), atol=1e-5, rtol=0)
    at_512 = loom_embeddings(folder, [long_text], max_length=512)
    assert (ours[0] - at_512[0]).abs().max() > 1e-3  # the cut changes the vector, so the equality above means it


PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.mark.parametrize("include_prompt", [True, False])
def test_prompts_match_sentence_transformers(tmp_path, minilm_dir, include_prompt):
    """The folder's default prompt applies by itself; prompt_name= picks another, prompt= gives the text; with
    include_prompt false the prompt's tokens are left out of the pooling, as sentence-transformers counts them."""
    folder = st_folder(tmp_path, minilm_dir, {"pooling_mode": "weightedmean", "include_prompt": include_prompt},
                       st_config={"prompts": PROMPTS, "default_prompt_name": "query"})
    torch.testing.assert_close(loom_embeddings(folder, TEXTS), reference_embeddings(folder, TEXTS),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(loom_embeddings(folder, TEXTS, prompt_name="passage"),
                               reference_embeddings(folder, TEXTS, prompt_name="passage"), atol=1e-5, rtol=0)
    torch.testing.assert_close(loom_embeddings(folder, TEXTS, prompt="Represent this: "),
                               reference_embeddings(folder, TEXTS, prompt="Represent this: "), atol=1e-5, rtol=0)
    assert (loom_embeddings(folder, TEXTS[:1])[0] - loom_embeddings(folder, TEXTS[:1], prompt="")[0]).abs().max() > 1e-3


def test_unknown_prompt_name_is_refused(tmp_path, minilm_dir):
    folder = st_folder(tmp_path, minilm_dir, {"pooling_mode": "mean"}, st_config={"prompts": PROMPTS})
    with pytest.raises(ValueError, match=r"prompt_name='qery' is not one of the model's prompts: \['passage', 'query'\]"):
        loom.pipeline("feature-extraction", model=str(folder))("x", pooling="auto", prompt_name="qery")
    with pytest.raises(ValueError, match="not both"):
        loom.pipeline("feature-extraction", model=str(folder))("x", pooling="auto", prompt_name="query", prompt="q: ")


def test_a_module_loom_does_not_run_is_named(tmp_path, minilm_dir):
    custom = {"idx": 3, "name": "3", "path": "3_Custom", "type": "my_package.modules.Whitening"}
    folder = st_folder(tmp_path, minilm_dir, {"pooling_mode": "mean"}, extra_modules=(custom,))
    extractor = loom.pipeline("feature-extraction", model=str(folder))
    with pytest.raises(ValueError, match=r"modules\.json: module 3 is 'my_package\.modules\.Whitening' "
                                         r"\(folder '3_Custom'\), which loom does not run"):
        extractor("x", pooling="auto")
    assert len(extractor("x", pooling="mean")) == 384  # an explicit mode still pools the encoder's output


@pytest.mark.parametrize("activation", ["Tanh", "Identity"])
def test_dense_projection_matches_sentence_transformers(tmp_path, minilm_dir, activation):
    """Transformer -> Pooling -> Dense(384 -> 64) -> Normalize, as SentenceTransformer saves it."""
    torch.manual_seed(0)
    base = st.SentenceTransformer(str(minilm_dir), device="cpu")
    dense = st.models.Dense(384, 64, activation_function=getattr(torch.nn, activation)())
    st.SentenceTransformer(modules=[base[0], base[1], dense, base[2]], device="cpu").save(str(tmp_path / "dense"))
    expected = reference_embeddings(tmp_path / "dense", TEXTS)
    assert expected.shape == (len(TEXTS), 64)
    torch.testing.assert_close(loom_embeddings(tmp_path / "dense", TEXTS), expected, atol=1e-5, rtol=0)


def test_a_dense_module_without_weights_is_named(tmp_path, minilm_dir):
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    folder = st_folder(tmp_path, minilm_dir, {"pooling_mode": "mean"}, extra_modules=(dense,))
    (folder / "3_Dense").mkdir()
    (folder / "3_Dense" / "config.json").write_text(json.dumps({"in_features": 384, "out_features": 8}))
    with pytest.raises(ValueError, match="folder '3_Dense' has neither model.safetensors nor pytorch_model.bin"):
        loom.pipeline("feature-extraction", model=str(folder))("x", pooling="auto")


def test_loom_run_prints_the_same_embeddings(tmp_path, minilm_dir, capsys):
    from loom.cli import main

    folder = st_folder(tmp_path, minilm_dir, {"pooling_mode": "cls"},
                       st_config={"prompts": PROMPTS, "default_prompt_name": None})
    code = main(["run", "feature-extraction", "-m", str(folder), "-p", "pooling=auto", "-p", "prompt_name=query",
                 *TEXTS[:2]])
    assert code == 0
    printed = torch.tensor(json.loads(capsys.readouterr().out))
    torch.testing.assert_close(printed, reference_embeddings(folder, TEXTS[:2], prompt_name="query"),
                               atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory, minilm_dir):
    """A cross-encoder as sentence-transformers saves one: a one-logit BertForSequenceClassification."""
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(minilm_dir, num_labels=1)
    model = transformers.BertForSequenceClassification.from_pretrained(minilm_dir, config=config).eval()
    torch.nn.init.normal_(model.classifier.weight, std=0.2)
    path = tmp_path_factory.mktemp("reranker")
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, path / name)
    return path


def test_reranker_pair_scores_match_cross_encoder_and_the_reference(reranker_dir):
    import transformers

    pairs = [("How many people live in Berlin?", "Berlin has a population of 3.5 million."),
             ("How many people live in Berlin?", "Bananas are rich in potassium."),
             ("What is the capital of France?", "Paris is the capital and largest city of France, on the Seine.")]
    expected = torch.tensor(st.CrossEncoder(str(reranker_dir), device="cpu").predict(pairs)).float()
    assert expected.std() > 1e-3  # the pairs score differently, so agreement is not a constant
    classifier = loom.pipeline("text-classification", model=str(reranker_dir))
    ours = classifier([{"text": q, "text_pair": d} for q, d in pairs], batch_size=2)
    torch.testing.assert_close(torch.tensor([r["score"] for r in ours]), expected, atol=1e-5, rtol=0)
    reference = transformers.pipeline("text-classification", model=str(reranker_dir), device="cpu")
    theirs = reference([{"text": q, "text_pair": d} for q, d in pairs])
    assert [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs], abs=1e-5)


def test_older_layout_with_the_encoder_in_a_subfolder(tmp_path, minilm_dir):
    """sentence-transformers 2.x folders keep the encoder and its sentence_bert_config.json in `0_Transformer/`:
    loom loads the encoder from there and honours that max_seq_length (16 here, so the long texts are cut)."""
    folder = tmp_path / "old"
    encoder = folder / "0_Transformer"
    encoder.mkdir(parents=True)
    for item in minilm_dir.iterdir():
        if item.is_file() and item.name not in ST_FILES:
            (encoder / item.name).symlink_to(item)
    (encoder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384,
                                                                  "pooling_mode_mean_tokens": True}))
    (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    expected = reference_embeddings(folder, TEXTS)
    torch.testing.assert_close(loom_embeddings(folder, TEXTS), expected, atol=1e-5, rtol=0)
    uncut = loom.pipeline("feature-extraction", model=str(encoder))(TEXTS[3], pooling="mean", normalize=True,
                                                                   return_tensors=True)
    assert not torch.allclose(uncut, expected[3], atol=1e-3)  # the 16-token cut changed this long text's vector


def test_modules_json_path_cannot_leave_the_folder(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "../elsewhere", "type": "sentence_transformers.models.Transformer"}]))
    (tmp_path.parent / "elsewhere").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="leaves the model folder"):
        loom.pipeline("feature-extraction", model=str(tmp_path))
