"""Pipeline base: sanitize parameters -> preprocess -> batched `_forward` (inference mode, model's device) ->
postprocess, with length-grouped batching, streaming over iterables and results in input order.

A task subclass turns one input into one or more `Chunk`s (a long context becomes several overlapping chunks),
runs the model on batches of chunks, and turns the chunks of one input back into one answer.
"""
from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from loom.pipelines.batching import Chunk, collate, length_sorted_batches, split_outputs

logger = logging.getLogger("loom")

# inputs that are one item even though they are iterable
_SINGLE_TYPES = (str, bytes, dict)


def _is_stream(inputs: Any) -> bool:
    if isinstance(inputs, (list, tuple) + _SINGLE_TYPES) or torch.is_tensor(inputs):
        return False
    if type(inputs).__module__.startswith(("PIL.", "numpy")):
        return False
    return isinstance(inputs, Iterable)


class Pipeline:
    """Base class of every task pipeline; build one with `loom.pipeline(task, model=...)`."""

    task: ClassVar[str] = ""
    # model outputs with one row per token: cut back to each input's real length after batching
    per_token_outputs: ClassVar[tuple[str, ...]] = ()
    # decoder-only generation continues from the last position, so its batches are padded on the left
    pad_left: ClassVar[bool] = False
    # how many inputs are preprocessed and length-sorted together, per unit of batch size
    window_per_batch: ClassVar[int] = 32
    _window_start = 0

    def __init__(self, model, tokenizer=None, image_processor=None, processor=None, device=None, dtype=None,
                 batch_size: int | None = None, task: str | None = None, **kwargs: Any) -> None:
        if processor is not None:
            tokenizer = tokenizer or getattr(processor, "tokenizer", None)
            image_processor = image_processor or getattr(processor, "image_processor", None)
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor
        self.task = task or type(self).task
        self.batch_size = _check_batch_size(batch_size)
        self._place(device)
        if dtype is not None and model.dtype != dtype:
            logger.info("pipeline: dtype=%s ignored for a model object already in %s", dtype, model.dtype)
        self.model.eval()  # dropout off: inference_mode alone does not disable it
        self._init_params = kwargs
        self._sanitize_parameters(**kwargs)  # bad arguments fail now, not at the first call

    # -- placement ----------------------------------------------------------------------------------------------
    def _place(self, device) -> None:
        """Move the model to `device` only if it still sits on the CPU and is not dispatched over devices."""
        if device is None:
            return
        if isinstance(device, int):
            device = "cpu" if device < 0 else f"cuda:{device}"
        target = torch.device(device)
        current = self.model.device
        if current == target or (target.type == current.type and target.index in (None, current.index)):
            return
        if getattr(self.model, "hf_device_map", None) or current.type != "cpu":
            warnings.warn(f"pipeline: the model is already placed on {current} (or dispatched); it is not moved to "
                          f"{target}. Inputs go to the model's device.", stacklevel=3)
            return
        self.model.to(target)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the model's first parameter (its input embeddings)."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- task hooks ---------------------------------------------------------------------------------------------
    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        """Split call keyword arguments into (preprocess, forward, postprocess) parameters; reject unknown ones."""
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}")
        return {}, {}, {}

    def preprocess(self, item: Any, **params: Any) -> list[Chunk]:
        raise NotImplementedError

    def preprocess_many(self, items: list, **params: Any) -> list[list[Chunk]]:
        """Chunks for several inputs; text tasks override this to tokenize all of them in one call."""
        return [self.preprocess(item, **params) for item in items]

    def _forward(self, batch: dict[str, torch.Tensor], **params: Any) -> dict[str, Any]:
        return dict(self.model(**batch))

    def postprocess(self, chunks: list[Chunk], **params: Any) -> Any:
        raise NotImplementedError

    # -- running ------------------------------------------------------------------------------------------------
    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Run on one input (returns its answer), a list (returns a list) or any other iterable (returns an
        iterator that streams answers in input order)."""
        params = {**self._init_params, **kwargs}
        batch_size = _check_batch_size(params.pop("batch_size", self.batch_size))
        params.pop("num_workers", None)  # accepted for compatibility; preprocessing runs in this process
        stages = self._sanitize_parameters(**params)
        if inputs is None:
            raise ValueError(f"{self.task} pipeline got None; pass an input or a list of inputs")
        if _is_stream(inputs):
            return self._run(iter(inputs), batch_size, *stages)
        if isinstance(inputs, (list, tuple)):
            return list(self._run(iter(inputs), batch_size, *stages))
        return next(self._run(iter([inputs]), batch_size, *stages))

    def run_batches(self, items: list, batch_size: int | None = None, **kwargs: Any) -> list:
        """Answers for a list of already-normalised inputs (what task `__call__`s use after unpacking)."""
        params = {**self._init_params, **kwargs}
        stages = self._sanitize_parameters(**params)
        return list(self._run(iter(items), _check_batch_size(batch_size or self.batch_size), *stages))

    def _run(self, items: Iterator, batch_size: int, pre: dict, fwd: dict, post: dict) -> Iterator:
        if batch_size > 1 and self._pad_id() is None:
            warnings.warn(f"{self.task} pipeline: neither the tokenizer nor the model config has a pad token, so "
                          "inputs run one at a time; set tokenizer.pad_token to batch them", stacklevel=3)
            batch_size = 1
        window = 1 if batch_size == 1 else batch_size * self.window_per_batch
        self._window_start = 0  # position of the window's first input, so errors name the input's real index
        while True:
            items_now = list(itertools.islice(items, window))
            if not items_now:
                return
            per_item = self.preprocess_many(items_now, **pre)
            flat = [chunk for chunks in per_item for chunk in chunks]
            for rows in length_sorted_batches(flat, batch_size):
                self._forward_chunks([flat[i] for i in rows], fwd)
            for chunks in per_item:
                yield self.postprocess(chunks, **post)
            self._window_start += len(items_now)

    def _forward_chunks(self, chunks: list[Chunk], params: dict) -> None:
        if not chunks:
            return
        pad_id = self._pad_id()
        batch, padded = collate(chunks, 0 if pad_id is None else pad_id, self.pad_left, self.device)
        with torch.inference_mode():
            outputs = self._forward(batch, **params)
        split_outputs(outputs, chunks, padded, self.per_token_outputs, self.pad_left)

    def _pad_id(self) -> int | None:
        tok_pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        if self.tokenizer is None:
            return 0
        return tok_pad if tok_pad is not None else getattr(self.model.config, "pad_token_id", None)

    # -- helpers for text tasks -----------------------------------------------------------------------------------
    @property
    def max_length(self) -> int | None:
        """The longest input the model really takes: the smaller of the tokenizer's and the model's limits."""
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10**9:
            limits.append(tok_max)
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                # RoBERTa-like position ids start after the padding index
                offset = (config.pad_token_id + 1) if getattr(config, "model_type", "") in ("roberta", "xlm-roberta") \
                    else 0
                limits.append(value - offset)
                break
        return min(limits) if limits else None

    def model_inputs(self, encoding, index: int) -> dict[str, Any]:
        """Row `index` of a tokenizer output, keeping only the keys the model takes."""
        names = getattr(self.tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"]
        return {k: encoding[k][index] for k in names if k in encoding}

    def check_texts(self, items: list, what: str = "text") -> None:
        for i, item in enumerate(items):
            if not isinstance(item, str):
                where = f" at position {self._window_start + i}"
                raise TypeError(f"{self.task} pipeline expects {what} strings, got {type(item).__name__}{where}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, model={type(self.model).__name__}, device={self.device})"


def _check_batch_size(batch_size) -> int:
    if batch_size is None:
        return 1
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size
