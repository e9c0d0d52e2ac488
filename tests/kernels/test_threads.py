"""Threads and processes around the kernels: generate from 4 Python threads at once equals the serial results, a
model used in fork-started DataLoader workers after the parent ran the kernels' pool neither hangs nor crashes, and
torch.set_num_threads changed mid-run is honoured."""
from __future__ import annotations

import threading

import pytest
import torch
from loomtest import kernels_on

import loom
from loom.kernels import threads

pytestmark = pytest.mark.timeout(300)


def _model(seed: int = 0) -> loom.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = loom.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return loom.LlamaForCausalLM(cfg).eval()


PROMPTS = [torch.tensor([[1, 5, 9, 3]]), torch.tensor([[1, 7, 7]]), torch.tensor([[4, 2, 8, 8, 6]]),
           torch.tensor([[3, 3]])]


def test_generate_from_four_threads_equals_serial(two_threads):
    model = _model()
    serial = [model.generate(p, max_new_tokens=12, do_sample=False) for p in PROMPTS]
    results, errors = [None] * 4, []

    def run(i):
        try:
            for _ in range(3):
                out = model.generate(PROMPTS[i], max_new_tokens=12, do_sample=False)
                if results[i] is not None and not torch.equal(out, results[i]):
                    errors.append(f"thread {i} changed its answer")
                results[i] = out
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors and not any(w.is_alive() for w in workers)
    for got, want in zip(results, serial):
        assert torch.equal(got, want)
    assert torch.get_num_threads() == 2 and threads.handoffs_in_force() == 0


class _Prompts(torch.utils.data.Dataset):
    def __init__(self, model):
        self.model = model

    def __len__(self):
        return 4

    def __getitem__(self, i):
        with torch.no_grad():  # the kernels (and their pool, with 2 threads) run inside the worker
            return self.model(PROMPTS[i]).logits[0, -1]


def test_fork_started_dataloader_workers_after_the_parent_ran_the_kernels(two_threads):
    import multiprocessing

    model = _model()
    with torch.no_grad():
        want = [model(p).logits[0, -1] for p in PROMPTS]  # the parent's pool has run (2 threads)
        torch.ops.loom.rms_norm(torch.randn(4096, 256), torch.ones(256), 1e-6)  # a job big enough for the helpers
    loader = torch.utils.data.DataLoader(_Prompts(model), batch_size=None, num_workers=2,
                                         multiprocessing_context=multiprocessing.get_context("fork"), timeout=120)
    got = list(loader)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the parent's pool still works after the fork
        torch.testing.assert_close(model(PROMPTS[0]).logits[0, -1], want[0])


@pytest.mark.skipif(not kernels_on(), reason="needs loom's C kernels")
def test_set_num_threads_mid_run_is_honoured(two_threads):
    model = _model()
    seen = []

    class Spy:
        def __call__(self, input_ids, scores):
            seen.append(threads.pool_threads())
            return scores

    model.generate(PROMPTS[0], max_new_tokens=2, do_sample=False, logits_processor=[Spy()])
    torch.set_num_threads(1)
    assert threads.pool_threads() == 1
    model.generate(PROMPTS[0], max_new_tokens=2, do_sample=False, logits_processor=[Spy()])
    assert seen == [2, 2, 1, 1]


_X = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))  # made before any fork: the child
# avoids torch's random generator, whose lock a fork may copy while another thread holds it


def _pool_job(queue):
    # Torch's own ops stay on one thread here: GNU OpenMP can hang in a forked child whose parent ran OpenMP teams
    # from other threads (why DataLoader workers run torch on one thread). The kernels' pool gets 2 threads, so its
    # helpers are created in the child after the fork.
    torch.set_num_threads(2)
    with threads.kernels_own_threads():
        assert torch.get_num_threads() == 1 and threads.pool_threads() == 2
        y = torch.ops.loom.rms_norm(_X, torch.ones(256), 1e-6)
        queue.put((float((y - torch.rms_norm(_X, (256,), None, 1e-6)).abs().max()), threads.pool_helpers()))


@pytest.mark.skipif(not kernels_on(), reason="needs loom's C kernels")
def test_forked_children_run_the_pool_even_when_forked_mid_job(two_threads):
    """Another thread keeps the parent's pool busy while children are forked, so a fork can land while the pool's
    locks are held; each child must still run the pool on 2 threads (the locks are taken around fork)."""
    import multiprocessing

    stop = threading.Event()

    def hammer():
        torch.set_num_threads(2)
        w = torch.ones(256)
        while not stop.is_set():
            torch.ops.loom.rms_norm(_X, w, 1e-6)

    busy = threading.Thread(target=hammer)
    busy.start()
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        children = [ctx.Process(target=_pool_job, args=(queue,)) for _ in range(6)]
        for c in children:
            c.start()
        for c in children:
            c.join(60)
    finally:
        stop.set()
        busy.join(30)
    assert [c.exitcode for c in children] == [0] * 6
    results = [queue.get(timeout=5) for _ in children]
    assert max(err for err, _ in results) < 1e-5
    assert all(helpers == 1 for _, helpers in results), results  # the child's own helper, not the parent's count


@pytest.mark.skipif(not kernels_on(), reason="needs loom's C kernels")
@pytest.mark.parametrize("threads_", [2, 3])
@pytest.mark.parametrize("total,unit", [(24, 1), (25, 3), (12, 0)])
def test_pool_runs_each_chunk_once_when_a_helper_holds_an_old_ticket(threads_, total, unit):
    """The pool's claim race, forced: a helper pauses after reading the ticket and the caller pauses before publishing
    the next job's, so a helper holds the last ticket of one job while the next (larger) job's counters are set. Each
    item of each job must have run exactly once when parallel_run returns. Before the fix a stale ticket claimed a
    chunk of the next job: run twice, counted twice, and the caller returned before its last chunk was written.
    Claims are a share of what is left in whole units (guided), so a total that is not a multiple of the unit (25
    and 50 items in units of 3) must come out exactly covered too, and a unit of 0 is taken as 1."""
    from loom.kernels import build

    lib = build.library()
    for helper, publish in ((0, 0), (2000, 20000), (20000, 2000), (5000, 5000)):
        assert lib.loom_pool_selftest(60, total, unit, threads_, 200, helper, publish) == 0, (helper, publish)


@pytest.mark.skipif(not kernels_on(), reason="the handoff applies only where loom's C kernels run")
def test_a_thread_started_during_a_handoff_keeps_torchs_thread_count(two_threads):
    """The handoff puts torch on one thread for the calling thread only: a thread whose first torch call falls inside
    another thread's decode (a server's worker started meanwhile) still gets torch's count, then and afterwards."""
    import sentence_transformers  # noqa: F401 - loads scikit-learn's and sentencepiece's own libgomp copies too
    seen = []
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():  # torch's CPU wheels
        assert threads._this_thread_setter() is not torch.set_num_threads

    def worker():
        x = torch.randn(256, 256)
        (x @ x).sum()  # a first parallel op
        seen.append(torch.get_num_threads())

    with threads.kernels_own_threads():
        assert torch.get_num_threads() == 1 and threads.pool_threads() == 2
        t = threading.Thread(target=worker)
        t.start()
        t.join(30)
    assert torch.get_num_threads() == 2
    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert seen == [2, 2]


@pytest.mark.skipif(not kernels_on() or not torch.backends.mkl.is_available(),
                    reason="the handoff applies only where loom's C kernels run; MKL only where torch carries it")
def test_the_handoff_puts_mkl_on_one_thread_for_the_calling_thread_only(two_threads):
    """torch.sin/cos go to MKL's vector math, which keeps a thread count of its own: inside a handoff it is one for
    the calling thread (its second thread waited for the core a pool helper spun on), torch's count for any other
    thread, and the count from before afterwards."""
    assert threads._mkl_local_setter() is not None  # torch's CPU wheels carry MKL in libtorch_cpu
    assert threads.mkl_threads() == 2
    seen = []

    def other():
        seen.append(threads.mkl_threads())

    with threads.kernels_own_threads():
        assert threads.mkl_threads() == 1
        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        x = torch.linspace(-40, 40, 4096)
        inside = (x.sin(), x.cos())
    assert threads.mkl_threads() == 2 and seen == [2]
    assert torch.equal(inside[0], x.sin()) and torch.equal(inside[1], x.cos())  # one thread or two, the same bits
