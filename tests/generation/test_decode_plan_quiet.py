"""The decode plan's quiet steps (loom/generation/decode_plan.py): after a full check, a step checks only what the
plan itself moves while nothing but loom's code has run since. Every way other code can run between steps (a
streamer, a logits processor or stopping criterion of the user's, a hook on the head or the final norm, a model class
of the user's, another Python thread, a profile function, a gc callback) sends every step back to the full check,
and a change made by such code in the middle of a generate is honoured at the next step. Runs with loom's kernels on
and off (off: no plan is built, no check runs)."""
from __future__ import annotations

import gc
import io
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import tqdm

from loom.generation import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, \
    TextStreamer
from loom.generation.decode_plan import DecodePlan
from loom.kernels import build
from test_decode_plan import _generate, _ids, _same
from test_fused_decode import _model

NEW = 10  # new tokens: the prefill's, then 9 decode steps


def _checked(model, monkeypatch, **kw):
    """(output, plan steps, full checks) of a planned generate, and the same generate without the plan (which must
    give the same tokens and scores)."""
    checks = [0]
    unchanged = DecodePlan.unchanged

    def counted(self, *args):
        checks[0] += 1
        return unchanged(self, *args)
    with monkeypatch.context() as m:
        m.setattr(DecodePlan, "unchanged", counted)
        out, steps = _generate(model, monkeypatch, True, input_ids=_ids(), max_new_tokens=NEW, **kw)
    return out, steps, checks[0]


def _steps(model) -> int:
    return (NEW - 1) * model.config.num_hidden_layers if build.available() else 0


class _Noop(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


class _NeverStop(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class _Streamer:
    def put(self, value):
        pass

    def end(self):
        pass


def test_a_quiet_generate_checks_once(monkeypatch):
    """Greedy, and sampling through loom's own warpers and penalties: one full check, then quiet steps; the tokens
    and scores are the forward's. tqdm's monitor thread (alive after any progress bar, e.g. a hub download's) does
    not count as other code."""
    with tqdm.tqdm(total=1, disable=False, file=io.StringIO()):
        pass
    assert any(type(t).__name__ == "TMonitor" for t in threading.enumerate())
    model = _model("llama", torch.float32)
    for kw in ({}, dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.7, repetition_penalty=1.3)):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            a, steps, checks = _checked(model, monkeypatch, **kw)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            b, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=NEW, **kw)
        assert _same(a, b) and steps == _steps(model)
        assert checks == (1 if build.available() else 0)


def _other_thread():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    return stop.set


def _idle_pool():
    """A thread pool whose two workers have each run an item (both at once: neither could take the other's) and now
    wait for work, as torch.compile leaves inductor's compile pool."""
    pool = ThreadPoolExecutor(2)
    both = threading.Barrier(2)
    for f in [pool.submit(both.wait, 10) for _ in range(2)]:
        f.result()
    assert len(pool._threads) == 2
    return pool


def test_idle_thread_pool_workers_keep_steps_quiet(monkeypatch):
    """Workers of a concurrent.futures pool waiting for work run no code until a thread submits some: one full check,
    as with no other thread; once one of them runs an item, every step checks again (the parametrized test below)."""
    pool = _idle_pool()
    try:
        model = _model("llama", torch.float32)
        a, steps, checks = _checked(model, monkeypatch)
        b, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=NEW)
        assert _same(a, b) and steps == _steps(model)
        assert checks == (1 if build.available() else 0)
    finally:
        pool.shutdown()


def _busy_pool(initializer: bool):
    """A pool whose worker runs an item of the user's, or its initializer, until the returned function is called."""
    stop = threading.Event()
    if initializer:
        pool = ThreadPoolExecutor(1, initializer=stop.wait)
        pool.submit(int)
    else:
        pool = _idle_pool()  # idle workers, one of which then takes an item that waits
        started = threading.Event()
        pool.submit(lambda: (started.set(), stop.wait()))
        started.wait(10)
    return lambda: (stop.set(), pool.shutdown())


@pytest.mark.parametrize("what", ["streamer", "processor", "criterion", "head hook", "norm pre-hook", "model class",
                                  "thread", "busy pool worker", "pool initializer", "profile", "gc callback"])
def test_other_code_between_steps_means_a_full_check_at_every_step(what, monkeypatch):
    model = _model("llama", torch.float32)
    kw, undo = {}, []
    if what == "streamer":
        kw["streamer"] = _Streamer()
    elif what == "processor":
        kw["logits_processor"] = LogitsProcessorList([_Noop()])
    elif what == "criterion":
        kw["stopping_criteria"] = StoppingCriteriaList([_NeverStop()])
    elif what == "head hook":
        undo.append(model.lm_head.register_forward_hook(lambda m, args, out: None).remove)
    elif what == "norm pre-hook":
        undo.append(model.model.norm.register_forward_pre_hook(lambda m, args: None).remove)
    elif what == "model class":
        cls = type(model)
        model.__class__ = type("UsersLlama", (cls,), {})  # a class defined outside loom (this test's module)
        undo.append(lambda: setattr(model, "__class__", cls))
    elif what == "thread":
        undo.append(_other_thread())
    elif what in ("busy pool worker", "pool initializer"):
        undo.append(_busy_pool(what == "pool initializer"))
    elif what == "profile":
        sys.setprofile(lambda *args: None)
        undo.append(lambda: sys.setprofile(None))
    else:
        gc.callbacks.append(lambda *args: None)
        undo.append(gc.callbacks.pop)
    try:
        a, steps, checks = _checked(model, monkeypatch, **kw)
    finally:
        for u in undo:
            u()
    b, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=NEW)
    assert _same(a, b) and steps == _steps(model)
    assert checks == (NEW - 1 if build.available() else 0)


@pytest.mark.parametrize("where", ["processor", "head hook"])
def test_a_change_made_between_steps_is_honoured(where, monkeypatch):
    """A logits processor of the user's, or a forward hook on the head, registers a hook that changes a layer's
    output after the 4th token: the plan runs the steps before it and the forward those after, with the tokens and
    scores of a generate that never planned."""
    model = _model("llama", torch.float32)
    q = model.model.layers[1].self_attn.q_proj
    handles = []

    def change():
        handles.append(q.register_forward_hook(lambda m, args, out: out * 3))

    def run(plan: bool):
        calls = [0]

        def maybe_change():
            calls[0] += 1
            if calls[0] == 4:
                change()
        kw = {}
        if where == "processor":
            class Changer(LogitsProcessor):
                def __call__(self, input_ids, scores):
                    maybe_change()
                    return scores
            kw["logits_processor"] = LogitsProcessorList([Changer()])
        else:
            handles.append(model.lm_head.register_forward_hook(lambda m, args, out: maybe_change()))
        try:
            return _generate(model, monkeypatch, plan, input_ids=_ids(), max_new_tokens=NEW, **kw)
        finally:
            for h in handles:
                h.remove()
            handles.clear()
    (a, steps), (b, _) = run(True), run(False)
    assert _same(a, b)
    # the processor's 4th call comes before the 4th step (its 1st is on the prefill's logits); the head's 4th call is
    # inside the 3rd step (its 1st is the prefill's), after that step's layers: either way steps 1-3 are planned
    planned = 3
    assert steps == (planned * model.config.num_hidden_layers if build.available() else 0)


def _loom_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models

    import loom
    engine = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    return loom.PreTrainedTokenizerFast(tokenizer_object=engine)


@pytest.mark.parametrize("what", ["loom's TextStreamer", "a subclass", "stdout replaced"])
def test_loom_text_streamer_keeps_steps_quiet(what, monkeypatch):
    """The `loom` command line's streamer (TextStreamer itself over a loom tokenizer, printing to a plain stdout) runs
    only loom's code between steps: one full check. A subclass (its own on_finalized_text) or a stdout of the
    caller's is code of theirs: a full check at every step. The text printed is the generated tokens' either way."""
    model = _model("llama", torch.float32)
    tok = _loom_tokenizer(model.config.vocab_size)
    out = io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stdout", io.StringIO() if what == "stdout replaced" else stdout)
    cls = TextStreamer if what != "a subclass" else type("Mine", (TextStreamer,), {})
    a, steps, checks = _checked(model, monkeypatch, streamer=cls(tok, skip_prompt=True))
    b, _ = _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=NEW)
    assert _same(a, b) and steps == _steps(model)
    quiet = what == "loom's TextStreamer"
    assert checks == ((1 if quiet else NEW - 1) if build.available() else 0)
    printed = out.getvalue().decode() if what != "stdout replaced" else sys.stdout.getvalue()
    assert printed == tok.decode(a.sequences[0, _ids().shape[1]:].tolist()) + "\n"  # a newline at the end


def test_a_hook_left_behind_by_code_that_has_gone_keeps_the_full_checks(monkeypatch):
    """A profile function (other code: full checks) registers a pre-hook on the final norm and removes itself; the
    hook, a module call of the user's at every step, later registers a hook on a layer's projection. Every step
    after the profile function left still runs the full check (the norm is no longer loom's code alone), so the
    layer's hook is honoured: the tokens and scores of a generate that never planned."""
    model = _model("llama", torch.float32)
    q = model.model.layers[1].self_attn.q_proj
    handles = []

    def run(plan: bool):
        calls, norm_calls = [0], [0]

        def norm_hook(m, args):
            norm_calls[0] += 1
            if norm_calls[0] == 4:
                handles.append(q.register_forward_hook(lambda m, args, out: out * 3))

        def profile(frame, event, arg):  # at the second decode step's start, after the plan was built
            if event == "call" and frame.f_code.co_name == "step" and frame.f_code.co_filename.endswith("decoder.py"):
                calls[0] += 1
                if calls[0] == 2:
                    handles.append(model.model.norm.register_forward_pre_hook(norm_hook))
                    sys.setprofile(None)
        sys.setprofile(profile)
        try:
            return _checked(model, monkeypatch)[0] if plan else \
                _generate(model, monkeypatch, False, input_ids=_ids(), max_new_tokens=NEW)[0]
        finally:
            sys.setprofile(None)
            for h in handles:
                h.remove()
            handles.clear()
    assert _same(run(True), run(False))
