"""AutoImageProcessor and AutoProcessor: pick the processor class from the files of a model directory.

A processor bundles what a model needs to turn raw inputs into tensors: a tokenizer, an image processor, or both.
AutoProcessor returns the bundle when processor_config.json (or a `processor_class`) asks for one, otherwise the one
component there is, as the reference does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loom.hub import HUB_KWARGS
from loom.hub_push import PushToHubMixin
from loom.processing.image_processor import BaseImageProcessor, ViTImageProcessor, read_processor_config

IMAGE_PROCESSORS: dict[str, type[BaseImageProcessor]] = {
    "ViTImageProcessor": ViTImageProcessor,
    "ViTFeatureExtractor": ViTImageProcessor,
    "ViTImageProcessorFast": ViTImageProcessor,
    "ViTImageProcessorPil": ViTImageProcessor,
}
# model_type -> image processor, for preprocessor configs that do not name their class
IMAGE_PROCESSOR_FOR_MODEL = {"vit": ViTImageProcessor}
PROCESSOR_CONFIG_NAME = "processor_config.json"


class AutoImageProcessor:
    """`AutoImageProcessor.from_pretrained(path)` reads preprocessor_config.json and builds the matching class."""

    def __init__(self) -> None:
        raise EnvironmentError("use AutoImageProcessor.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **kwargs: Any) -> BaseImageProcessor:
        hub = {k: kwargs[k] for k in kwargs if k in HUB_KWARGS}
        data = read_processor_config(path_or_id, kwargs)
        name = data.get("image_processor_type") or data.get("feature_extractor_type")
        cls = IMAGE_PROCESSORS.get(name) if name else _class_from_model_type(path_or_id, hub)
        if cls is None:
            raise ValueError(f"{path_or_id}: image processor {name!r} is not supported by loom; supported: "
                             f"{sorted(IMAGE_PROCESSORS)}")
        return cls.from_dict(data, **kwargs)


def _class_from_model_type(path_or_id, hub) -> type[BaseImageProcessor] | None:
    from loom.configuration import read_config_dict
    from loom.hub import resolve_file

    path = resolve_file(path_or_id, "config.json", required=False, **hub)
    model_type = read_config_dict(path).get("model_type") if path else None
    return IMAGE_PROCESSOR_FOR_MODEL.get(model_type)


class ProcessorMixin(PushToHubMixin):
    """A bundle of a tokenizer and an image processor; calling it runs each on its own inputs and merges them."""

    def __init__(self, image_processor: BaseImageProcessor | None = None, tokenizer=None, **extra: Any) -> None:
        if image_processor is None and tokenizer is None:
            raise ValueError("a processor needs an image_processor, a tokenizer, or both")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.extra = extra

    def __call__(self, text=None, images=None, return_tensors: str | None = None, **kwargs: Any):
        if text is None and images is None:
            raise ValueError("pass text=..., images=..., or both")
        out: dict[str, Any] = {}
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("this processor has no tokenizer, so it cannot take text")
            out.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        if images is not None:
            if self.image_processor is None:
                raise ValueError("this processor has no image processor, so it cannot take images")
            out.update(self.image_processor(images, return_tensors=return_tensors))
        from loom.processing.features import BatchFeature

        return BatchFeature(out)

    def batch_decode(self, *args: Any, **kwargs: Any):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from loom.utils import atomic_write_text

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        atomic_write_text(directory / PROCESSOR_CONFIG_NAME,
                          json.dumps({"processor_class": type(self).__name__, **self.extra}, indent=2) + "\n")


class AutoProcessor:
    """`AutoProcessor.from_pretrained(path)`: a ProcessorMixin bundle, or the single tokenizer/image processor."""

    def __init__(self) -> None:
        raise EnvironmentError("use AutoProcessor.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **kwargs: Any):
        bundle = read_processor_config(path_or_id, dict(kwargs), PROCESSOR_CONFIG_NAME, required=False)
        image_config = read_processor_config(path_or_id, dict(kwargs), required=False)
        image_processor = AutoImageProcessor.from_pretrained(path_or_id, **kwargs) if image_config else None
        tokenizer = _tokenizer_or_none(path_or_id, kwargs)
        wants_bundle = bundle is not None or (image_config or {}).get("processor_class")
        if wants_bundle or (image_processor is not None and tokenizer is not None):
            extra = {k: v for k, v in (bundle or {}).items() if k != "processor_class"}
            return ProcessorMixin(image_processor=image_processor, tokenizer=tokenizer, **extra)
        if image_processor is not None:
            return image_processor
        if tokenizer is not None:
            return tokenizer
        raise OSError(f"{path_or_id} has no processor files: expected processor_config.json, "
                      "preprocessor_config.json or tokenizer files (tokenizer.json, vocab.txt, ...)")


def _tokenizer_or_none(path_or_id, kwargs):
    from loom.hub import resolve_file

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
    if not any(resolve_file(path_or_id, n, required=False) for n in names):
        return None
    from loom.tokenization import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_id, **kwargs)
