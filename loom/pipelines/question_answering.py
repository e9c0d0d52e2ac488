"""question-answering (extractive): the span of the context that best answers a question, in the output format
of the reference's 4.x releases ({"score", "start", "end", "answer"}; 5.x dropped this task).

Long contexts are split into overlapping windows (`doc_stride` tokens of overlap); every window is scored and the
best spans over all windows win. Span scores are P(start) * P(end) with both softmaxes taken over the context
tokens and the [CLS] position, whose product is the "no answer" score."""
from __future__ import annotations

from typing import Any

import numpy as np

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.scores import check_top_k, softmax


class QuestionAnsweringPipeline(Pipeline):
    """pipe(question=..., context=...) or pipe({"question": ..., "context": ...}) (or lists of either).
    One answer {"score", "start", "end", "answer"} per question, or a list of top_k of them; context[start:end]
    is the answer."""

    task = "question-answering"
    per_token_outputs = ("start_logits", "end_logits")

    def __call__(self, *args: Any, question=None, context=None, **kwargs: Any) -> Any:
        if args and (question is not None or context is not None):
            raise TypeError("pass either question=/context= or positional inputs, not both")
        if len(args) == 2 and all(isinstance(a, str) for a in args):  # pipe(question, context)
            question, context = args
            args = ()
        if args:
            if len(args) > 1:
                raise TypeError("question-answering takes one positional input (a dict or a list of dicts)")
            return super().__call__(args[0], **kwargs)
        if question is None or context is None:
            raise ValueError("question-answering needs both question= and context=")
        if isinstance(question, list) or isinstance(context, list):
            questions = question if isinstance(question, list) else [question] * len(context)
            contexts = context if isinstance(context, list) else [context] * len(questions)
            if len(questions) != len(contexts):
                raise ValueError(f"got {len(questions)} questions but {len(contexts)} contexts; pass as many of each")
            return super().__call__([{"question": q, "context": c} for q, c in zip(questions, contexts)], **kwargs)
        return super().__call__({"question": question, "context": context}, **kwargs)

    def _sanitize_parameters(self, top_k=1, doc_stride=128, max_answer_len=15, max_seq_len=384,
                             max_question_len=64, handle_impossible_answer=False, topk=None, **kwargs):
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes top_k, "
                            "doc_stride, max_answer_len, max_seq_len, max_question_len, handle_impossible_answer, "
                            "batch_size")
        top_k = topk if topk is not None else top_k
        check_top_k(top_k)
        if top_k is None:
            raise ValueError("top_k must be a positive integer for question-answering")
        if not isinstance(max_answer_len, int) or max_answer_len < 1:
            raise ValueError(f"max_answer_len must be a positive integer, got {max_answer_len!r}")
        seq_len = min(max_seq_len, self.max_length or max_seq_len)
        if not isinstance(doc_stride, int) or doc_stride < 0:
            raise ValueError(f"doc_stride must be a non-negative integer, got {doc_stride!r}")
        pre = {"max_seq_len": seq_len, "doc_stride": min(doc_stride, seq_len // 2),
               "max_question_len": max_question_len}
        return pre, {}, {"top_k": top_k, "max_answer_len": max_answer_len, "impossible": handle_impossible_answer}

    def preprocess_many(self, items: list, max_seq_len=384, doc_stride=128, max_question_len=64):
        questions, contexts = [], []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not {"question", "context"} <= set(item):
                raise ValueError(f"question-answering input {self._window_start + i} must be a dict with 'question' and 'context'")
            q, c = item["question"], item["context"]
            if not isinstance(q, str) or not isinstance(c, str) or not q.strip() or not c.strip():
                raise ValueError(f"question-answering input {self._window_start + i}: the question and the context must be non-empty "
                                 "strings")
            questions.append(q)
            contexts.append(c)
        enc = self.tokenizer(questions, contexts, truncation="only_second", max_length=max_seq_len,
                             stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        cls_id = getattr(self.tokenizer, "cls_token_id", None)
        out: list[list[Chunk]] = [[] for _ in items]
        for row, owner in enumerate(enc["overflow_to_sample_mapping"]):
            ids = np.array(enc["input_ids"][row])
            valid = np.array([s == 1 for s in enc.sequence_ids(row)])
            if cls_id is not None:
                valid |= ids == cls_id  # [CLS] stays in the softmax: its score is the "no answer" score
            meta = {"context": contexts[owner], "offsets": enc["offset_mapping"][row], "valid": valid}
            out[owner].append(Chunk(self.model_inputs(enc, row), meta))
        return out

    def _forward(self, batch, **_):
        out = self.model(**batch)
        return {"start_logits": out.start_logits, "end_logits": out.end_logits}

    def postprocess(self, chunks: list[Chunk], top_k=1, max_answer_len=15, impossible=False) -> Any:
        answers, null_score = [], 1e6
        for chunk in chunks:
            valid, offsets, context = chunk.meta["valid"], chunk.meta["offsets"], chunk.meta["context"]
            start = softmax(np.where(valid, chunk.outputs["start_logits"].float().numpy(), -10000.0))
            end = softmax(np.where(valid, chunk.outputs["end_logits"].float().numpy(), -10000.0))
            null_score = min(null_score, float(start[0] * end[0]))
            start[0] = end[0] = 0.0
            # [CLS] only scores "no answer": spans are decoded over context tokens alone
            context_only = valid.copy()
            context_only[0] = False
            for s, e, score in best_spans(start, end, top_k, max_answer_len, context_only):
                a, b = int(offsets[s][0]), int(offsets[e][1])
                answers.append({"score": float(score), "start": a, "end": b, "answer": context[a:b]})
        if impossible:
            answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers


def best_spans(start: np.ndarray, end: np.ndarray, top_k: int, max_len: int, valid: np.ndarray):
    """The top_k (start, end, score) with start <= end < start + max_len, both on valid positions."""
    scores = np.tril(np.triu(np.outer(start, end)), max_len - 1)  # (T, T): zero outside allowed spans
    flat = scores.ravel()
    if top_k == 1:
        order = np.array([int(np.argmax(flat))])
    elif len(flat) <= top_k:
        order = np.argsort(-flat)
    else:
        order = np.argpartition(-flat, top_k)[:top_k]
        order = order[np.argsort(-flat[order])]
    starts, ends = np.unravel_index(order, scores.shape)
    keep = valid[starts] & valid[ends] & (ends >= starts) & (ends - starts < max_len)
    return [(int(s), int(e), scores[s, e]) for s, e in zip(starts[keep], ends[keep])]
