"""AsyncTextIteratorStreamer: `async for` over the text of a `generate` running in a thread, as the reference's."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import loom
from gen_helpers import ByteTokenizer, model_pair


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return model_pair(tmp_path_factory, "llama", pad_token_id=0)[0]


def _collect(llama, timeout):
    tok = ByteTokenizer()
    ids = torch.tensor([[1, 30, 31]])

    async def run():
        streamer = loom.AsyncTextIteratorStreamer(tok, timeout=timeout)
        thread = threading.Thread(target=llama.generate, kwargs=dict(
            input_ids=ids, max_new_tokens=12, eos_token_id=None, streamer=streamer))
        thread.start()
        try:
            return "".join([piece async for piece in streamer])
        finally:
            thread.join()

    return asyncio.run(run()), tok.decode(llama.generate(ids, max_new_tokens=12, eos_token_id=None)[0])


def test_async_streamer_yields_the_generated_text(llama):
    streamed, full = _collect(llama, timeout=60)
    assert streamed == full  # prompt included, as with TextIteratorStreamer(skip_prompt=False)


def test_async_streamer_timeout_raises_timeout_error(llama):
    with pytest.raises(TimeoutError):
        _collect(llama, timeout=1e-6)


def test_async_streamer_needs_a_running_loop():
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        loom.AsyncTextIteratorStreamer(ByteTokenizer())
