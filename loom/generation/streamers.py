"""Streamers: receive tokens from `generate` as they are produced and turn them into text incrementally.

`generate` calls `put(prompt_ids)` once, then `put(new_token_ids)` per step, then `end()`. Text is released only
when it is final: a trailing U+FFFD (the first bytes of a multi-byte character whose remaining bytes are in the next
token) is held back, so characters are never split.
"""
from __future__ import annotations

import io
import sys
from queue import Queue
from typing import Any


class BaseStreamer:
    def put(self, value) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


def runs_only_loom(streamer) -> bool:
    """Whether `streamer.put` runs only loom's code: a TextStreamer itself (not a subclass) over one of loom's
    tokenizers, printing to a plain stdout (the `loom` command line's case). Such a streamer leaves generate's decode
    steps quiet (loom/generation/decode_plan.py); any other streamer is code of the caller's between steps."""
    return (type(streamer) is TextStreamer and type(streamer.tokenizer).__module__.startswith("loom.")
            and type(sys.stdout) is io.TextIOWrapper)


class TextStreamer(BaseStreamer):
    """Print text to stdout as soon as it is decoded (batch size 1)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TextStreamer streams one sequence; generate with batch size 1 (and num_beams=1)")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        stable = len(text.rstrip("\ufffd"))
        printable = text[self.print_len:stable]
        if text.endswith("\n"):
            # Restart decoding from the last token so the cache (and the cost of decoding it) stays small; keep that
            # token as context because decoders drop or add leading spaces at the start of a sequence.
            self.token_cache = self.token_cache[-1:]
            self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        else:
            self.print_len = max(self.print_len, stable)
        self.on_finalized_text(printable)

    def end(self) -> None:
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs) if self.token_cache else ""
        printable = text[self.print_len:]
        self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end=None if stream_end else "")


class TextIteratorStreamer(TextStreamer):
    """Queue the text so another thread can iterate over it while `generate` runs:

        streamer = TextIteratorStreamer(tok); Thread(target=model.generate, kwargs=dict(..., streamer=streamer)).start()
        for piece in streamer: ...
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value


class AsyncTextIteratorStreamer(TextStreamer):
    """The asyncio form of TextIteratorStreamer: create it inside a running event loop, run `generate` in a thread,
    and `async for piece in streamer`. A `timeout` (seconds per piece) raises TimeoutError.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        import asyncio

        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("AsyncTextIteratorStreamer must be created inside a running asyncio event loop "
                               "(e.g. in an `async def`); use TextIteratorStreamer from plain threads") from None
        self.text_queue = asyncio.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        # called from the generating thread: hand over to the loop's thread
        self.loop.call_soon_threadsafe(self.text_queue.put_nowait, text)
        if stream_end:
            self.loop.call_soon_threadsafe(self.text_queue.put_nowait, self.stop_signal)

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        import asyncio

        async with asyncio.timeout(self.timeout):
            value = await self.text_queue.get()
        if value is self.stop_signal:
            raise StopAsyncIteration
        return value
