"""`pipeline(task, model=...)`: resolve the task, load what is missing (model, tokenizer, image processor), place
the model, and build the task's Pipeline."""
from __future__ import annotations

import os
from typing import Any

from loom.pipelines.base import Pipeline
from loom.pipelines.registry import resolve_task, task_for_architectures


def pipeline(task: str | None = None, model=None, tokenizer=None, processor=None, device=None, dtype=None,
             batch_size: int | None = None, *, image_processor=None, device_map=None, torch_dtype=None,
             model_kwargs: dict | None = None, **kwargs: Any) -> Pipeline:
    """Build a task pipeline.

    task: a task name or alias (see `loom.pipelines.registry.TASKS`); inferred from the model's `architectures`
        when omitted. model: a directory, hub id or loaded loom model; feature-extraction and sentence-similarity
        default to the embedded all-MiniLM-L6-v2. device: where a model loaded here goes (a model object that is
        already placed is never moved). batch_size: inputs per forward pass, grouped by length.
        Other keyword arguments become the task's default call arguments (e.g. top_k=3).
    """
    from loom.auto import AutoConfig, model_class_for

    if task is None and model is None:
        raise ValueError("pipeline() needs a task, a model, or both, e.g. pipeline('text-classification', "
                         "model='path/to/checkpoint')")
    dtype = dtype if dtype is not None else torch_dtype
    if task is None:
        config = model.config if hasattr(model, "config") else AutoConfig.from_pretrained(model)
        task = task_for_architectures(getattr(config, "architectures", None), str(_name(model)))
    name, spec = resolve_task(task)
    if model is None:
        if spec.default_model is None:
            raise ValueError(f"task {name!r} has no default model available offline; pass model='path/or/id' "
                             "(a checkpoint directory or hub id with the matching head)")
        model = spec.default_model
    if isinstance(model, (str, os.PathLike)):
        from loom.pipelines.pooling import transformer_folder

        model = transformer_folder(model) or model  # an older sentence-transformers folder's 0_Transformer/
        config = AutoConfig.from_pretrained(model)
        _check_checkpoint_head(config, spec.head, name, model)
        cls = model_class_for(config.model_type, spec.head, str(model))
        load = dict(model_kwargs or {})
        if dtype is not None:
            load.setdefault("dtype", dtype)
        if device_map is not None:
            load.setdefault("device_map", device_map)
        model = cls.from_pretrained(model, config=config, **load)
    else:
        model = _fit_model_object(model, spec.head, name)
    source = processor_source(model)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(tokenizer)
    if isinstance(tokenizer, tuple):  # the reference's (name, kwargs) form
        tokenizer = _load_tokenizer(tokenizer[0], **tokenizer[1])
    if isinstance(processor, (str, os.PathLike)):
        from loom.processing import AutoProcessor

        processor = AutoProcessor.from_pretrained(processor)
    if processor is not None:
        tokenizer, image_processor = _split_processor(processor, tokenizer, image_processor)
    if spec.needs_tokenizer and tokenizer is None:
        if source is None:
            raise ValueError(f"the {name} pipeline needs a tokenizer: pass tokenizer= (the model object does not "
                             "say where it was loaded from)")
        tokenizer = _load_tokenizer(source)
    if spec.needs_image_processor and image_processor is None:
        if source is not None:
            from loom.processing import AutoImageProcessor

            image_processor = AutoImageProcessor.from_pretrained(source)
        else:
            raise ValueError(f"the {name} pipeline needs an image processor: pass image_processor=")
    elif isinstance(image_processor, (str, os.PathLike)):
        from loom.processing import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(image_processor)
    cls = spec.pipeline_class()
    return cls(model=model, tokenizer=tokenizer, image_processor=image_processor, processor=processor,
               device=device if device_map is None else None, batch_size=batch_size, task=name, **kwargs)


def _split_processor(processor, tokenizer, image_processor):
    """(tokenizer, image processor) from a processor bundle, a lone image processor or a lone tokenizer."""
    from loom.processing import BaseImageProcessor

    if isinstance(processor, BaseImageProcessor):
        return tokenizer, image_processor or processor
    if hasattr(processor, "image_processor") or hasattr(processor, "tokenizer") and \
            not hasattr(processor, "convert_ids_to_tokens"):
        return (tokenizer or getattr(processor, "tokenizer", None),
                image_processor or getattr(processor, "image_processor", None))
    return tokenizer or processor, image_processor


def _name(model) -> str:
    return getattr(model, "name_or_path", None) or str(model)


def processor_source(model) -> str | None:
    """The directory or id a model was loaded from (where its tokenizer / processor files are), if known."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return name or None


def _load_tokenizer(source, **kwargs):
    from loom.tokenization import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **kwargs)


def _check_checkpoint_head(config, head: str, task: str, source) -> None:
    """Refuse a checkpoint trained for another head when the task needs a trained head (a fresh random head
    would give meaningless answers)."""
    if head in ("base", "causal-lm", "masked-lm"):
        return
    from loom.auto import model_table

    heads = model_table().get(config.model_type, (None, {}))[1]
    wanted = heads[head].__name__ if head in heads else None
    archs = getattr(config, "architectures", None) or []
    if wanted and archs and wanted not in archs:
        raise ValueError(f"{source} holds a {archs[0]} checkpoint, which has no trained {head} head for the "
                         f"{task} task (it needs {wanted}); pick a checkpoint fine-tuned for {task}, or the task "
                         "that matches this model")


def _fit_model_object(model, head: str, task: str):
    """A loaded model for `task`: its own class must be the task's head; feature-extraction takes the base model
    out of any head model."""
    from loom.auto import model_class_for

    if not hasattr(model, "config") or not hasattr(model, "forward"):
        raise TypeError(f"model must be a path, a hub id or a loaded loom model, got {type(model).__name__}")
    try:
        wanted = model_class_for(model.config.model_type, head, type(model).__name__)
    except ValueError as e:
        raise ValueError(f"{type(model).__name__} cannot run the {task} task: {e}") from None
    if isinstance(model, wanted):
        return model
    if head == "base":
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if isinstance(base, wanted):
            return base
    raise ValueError(f"{type(model).__name__} cannot run the {task} task: that task needs a {wanted.__name__} "
                     f"(load the checkpoint with the matching Auto class, or pick the task that fits this model)")
