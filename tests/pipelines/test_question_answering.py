"""question-answering (4.x output format; the reference's 5.x has no such pipeline): answers checked against a
brute-force search over all spans of the model's own logits, spans slice back to their answers, long contexts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

CONTEXT = "The Eiffel Tower is in Paris. It was built in 1889 by Gustave Eiffel for the World's Fair."


def brute_force(qa_dir, question, context, max_answer_len=15):
    """Best (score, start char, end char) by trying every span, from the reference model's logits."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(qa_dir))
    model = transformers.BertForQuestionAnswering.from_pretrained(str(qa_dir)).eval()
    enc = tok(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        out = model(**enc)
    in_context = [s == 1 for s in enc.sequence_ids(0)]
    allowed = np.array(in_context)
    allowed[0] = True  # [CLS] takes part in the softmax (the "no answer" position)

    def probs(logits):
        x = np.where(allowed, logits[0].numpy(), -10000.0)
        e = np.exp(x - x.max())
        return e / e.sum()

    start, end = probs(out.start_logits), probs(out.end_logits)
    best = max((start[s] * end[e], s, e) for s in range(len(start)) for e in range(s, min(len(end), s + max_answer_len))
               if in_context[s] and in_context[e])
    return float(best[0]), offsets[best[1]][0], offsets[best[2]][1]


def test_answer_is_the_best_span(qa_dir, loom_pipeline):
    qa = loom_pipeline("question-answering", qa_dir)
    question = "Where is the tower?"
    answer = qa(question=question, context=CONTEXT)
    assert set(answer) == {"score", "start", "end", "answer"}
    score, start, end = brute_force(qa_dir, question, CONTEXT)
    assert (answer["start"], answer["end"]) == (start, end)
    assert answer["score"] == pytest.approx(score, abs=1e-5)
    assert CONTEXT[answer["start"]:answer["end"]] == answer["answer"]


def test_top_k_and_impossible_answer(qa_dir, loom_pipeline):
    qa = loom_pipeline("question-answering", qa_dir)
    answers = qa({"question": "Who built it?", "context": CONTEXT}, top_k=3, handle_impossible_answer=True)
    assert len(answers) == 3
    scores = [a["score"] for a in answers]
    assert scores == sorted(scores, reverse=True)
    for a in answers:
        assert CONTEXT[a["start"]:a["end"]] == a["answer"]
    with_null = qa(question="Who built it?", context=CONTEXT, top_k=10_000, handle_impossible_answer=True)
    null = [a for a in with_null if (a["start"], a["end"], a["answer"]) == (0, 0, "")]
    assert len(null) == 1 and 0 < null[0]["score"] < 1
    without = qa(question="Who built it?", context=CONTEXT, top_k=10_000)
    assert not [a for a in without if a["answer"] == ""]


def test_long_context_is_split_with_doc_stride(qa_dir, loom_pipeline):
    qa = loom_pipeline("question-answering", qa_dir)
    filler = "Nothing of note happened on that quiet day. " * 60
    context = filler + CONTEXT + " " + filler
    answer = qa(question="Where is the tower?", context=context, doc_stride=32, max_seq_len=96)
    assert context[answer["start"]:answer["end"]] == answer["answer"]
    assert 0 < answer["score"] <= 1


def test_batched_questions_match_one_by_one(qa_dir, loom_pipeline):
    qa = loom_pipeline("question-answering", qa_dir)
    questions = ["Where is the tower?", "When was it built?", "Who built it?"]
    batched = qa(question=questions, context=CONTEXT, batch_size=8)
    single = [qa(question=q, context=CONTEXT) for q in questions]
    for a, b in zip(batched, single):
        assert (a["start"], a["end"], a["answer"]) == (b["start"], b["end"], b["answer"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


@pytest.mark.parametrize("question, context", [("Where?", ""), ("", CONTEXT), ("Where?", "   ")])
def test_empty_question_or_context_is_a_clear_error(qa_dir, loom_pipeline, question, context):
    qa = loom_pipeline("question-answering", qa_dir)
    with pytest.raises(ValueError, match="question and the context must be non-empty"):
        qa(question=question, context=context)
