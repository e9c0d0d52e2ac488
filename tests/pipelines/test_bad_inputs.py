"""Bad inputs get clear errors (or a correct truncated answer), never a trace from deep inside the model."""
from __future__ import annotations

import pytest

import loom

LONG = "word " * 10_000


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown task 'sentiment'.*text-classification.*ner"):
        loom.pipeline("sentiment", model="x")


def test_no_task_and_no_model():
    with pytest.raises(ValueError, match="needs a task, a model, or both"):
        loom.pipeline()


def test_task_without_default_model_says_what_to_pass():
    with pytest.raises(ValueError, match="no default model.*pass model="):
        loom.pipeline("text-classification")


def test_task_is_inferred_from_architectures(sentiment_dir, ner_dir):
    assert loom.pipeline(model=str(sentiment_dir)).task == "text-classification"
    assert loom.pipeline(model=str(ner_dir)).task == "token-classification"


def test_model_head_that_does_not_fit_the_task(sentiment_dir, ner_dir, loom_pipeline):
    with pytest.raises(ValueError, match="no trained token-classification head"):
        loom.pipeline("ner", model=str(sentiment_dir))
    model = loom_pipeline("ner", ner_dir).model
    with pytest.raises(ValueError, match="cannot run the fill-mask task"):
        loom.pipeline("fill-mask", model=model, tokenizer=loom_pipeline("ner", ner_dir).tokenizer)


def test_nli_task_needs_an_entailment_label(sentiment_dir):
    with pytest.raises(ValueError, match="'entailment' label"):
        loom.pipeline("zero-shot-classification", model=str(sentiment_dir))


def test_none_and_empty_inputs(sentiment_dir, loom_pipeline):
    clf = loom_pipeline("sentiment-analysis", sentiment_dir)
    with pytest.raises(ValueError, match="got None"):
        clf(None)
    assert clf([]) == []
    result = clf("")  # an empty text is still a text: it gets a label, as in the reference
    assert result[0]["label"] in {"NEGATIVE", "POSITIVE"}
    with pytest.raises(ValueError, match="input 1 is a int"):
        clf(["fine", 3])


def test_ten_thousand_words_are_truncated(sentiment_dir, ner_dir, mlm_dir, loom_pipeline):
    assert loom_pipeline("sentiment-analysis", sentiment_dir)(LONG)[0]["label"] in {"NEGATIVE", "POSITIVE"}
    assert isinstance(loom_pipeline("ner", ner_dir)(LONG), list)
    embedding = loom_pipeline("feature-extraction")(LONG)
    assert len(embedding[0]) == 256 or len(embedding[0]) == 512  # the model's real limit, not 10,000 tokens
    with pytest.raises(ValueError, match="no mask token .* within its first"):
        loom_pipeline("fill-mask", mlm_dir)(LONG + "[MASK]")


def test_fill_mask_without_mask_token(mlm_dir, loom_pipeline):
    with pytest.raises(ValueError, match="has no mask token"):
        loom_pipeline("fill-mask", mlm_dir)("no mask here")


def test_unknown_arguments_are_named(sentiment_dir, loom_pipeline):
    with pytest.raises(TypeError, match=r"unknown arguments \['topk_typo'\]"):
        loom_pipeline("sentiment-analysis", sentiment_dir)("hi", topk_typo=3)
    with pytest.raises(ValueError, match="function_to_apply='cube'"):
        loom_pipeline("sentiment-analysis", sentiment_dir)("hi", function_to_apply="cube")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        loom_pipeline("sentiment-analysis", sentiment_dir)("hi", batch_size=0)


def test_zero_shot_needs_labels(nli_dir, loom_pipeline):
    zs = loom_pipeline("zero-shot-classification", nli_dir)
    with pytest.raises(ValueError, match="needs candidate_labels"):
        zs("some text")
    with pytest.raises(ValueError, match="has no '\\{\\}'"):
        zs("some text", candidate_labels=["a"], hypothesis_template="no slot")
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        zs("", candidate_labels=["a"])


def test_model_already_placed_is_not_moved(sentiment_dir, loom_pipeline):
    """A model object is only moved when it still sits on the CPU; asking for the device it is on is a no-op."""
    pipe = loom_pipeline("sentiment-analysis", sentiment_dir)
    again = loom.pipeline("sentiment-analysis", model=pipe.model, tokenizer=pipe.tokenizer, device="cpu")
    assert again.model is pipe.model and again.device.type == "cpu"
