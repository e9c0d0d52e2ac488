"""generate()'s buffers grow with what is generated, not with max_length: a huge max_new_tokens whose EOS comes early
costs what the tokens made cost (greedy, sampling, padded batches, beam search); a static cache, which does need
the whole length, is refused with a clear error when that length cannot fit."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gen_helpers import model_pair, prompts

HUGE = 10**12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return model_pair(tmp_path_factory, "llama", pad_token_id=0)[0]


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any op (factory, copy, cat, ...) returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


def _largest(fn):
    with LargestTensor() as seen:
        result = fn()
    return result, seen.nbytes


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_k=5), dict(num_beams=2, early_stopping=True)],
                         ids=["greedy", "sampling", "beams"])
def test_huge_max_new_tokens_with_early_eos_costs_what_is_generated(llama, kw):
    ids, mask = prompts([5, 8], seed=21)

    def run(n, eos):
        torch.manual_seed(0)
        return llama.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, **kw)

    free = run(30, None)
    eos = sorted({int(free[i, ids.shape[1] + 12]) for i in range(2)})  # a token each row emits early
    short, short_bytes = _largest(lambda: run(30, eos))
    assert short.shape[1] < ids.shape[1] + 30  # EOS stopped it before the limit
    long, long_bytes = _largest(lambda: run(HUGE, eos))
    assert torch.equal(long, short)
    assert long_bytes <= 2 * short_bytes, (long_bytes, short_bytes)  # before: a (rows, 10**12) buffer


def test_buffer_growth_keeps_long_generations_exact(llama):
    """Past several doublings of every buffer (token ids, mask, positions), the tokens equal a one-by-one run."""
    ids, mask = prompts([3, 6], seed=22)
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=200, eos_token_id=None)
    assert out.shape == (2, ids.shape[1] + 200)
    for row, n in enumerate([3, 6]):
        alone = llama.generate(ids[row:row + 1, ids.shape[1] - n:], max_new_tokens=200, eos_token_id=None)
        assert torch.equal(out[row, ids.shape[1]:], alone[0, n:])
    beams = llama.generate(ids, attention_mask=mask, max_new_tokens=150, num_beams=2, eos_token_id=None)
    assert beams.shape == (2, ids.shape[1] + 150)


def test_static_cache_that_cannot_fit_is_a_clear_error(llama):
    ids, mask = prompts([5, 8], seed=21)
    with pytest.raises(ValueError, match=r"StaticCache of max_cache_len=\d+ .*GiB.*max_new_tokens"):
        llama.generate(ids, attention_mask=mask, max_new_tokens=HUGE, cache_implementation="static")
