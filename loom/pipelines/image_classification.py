"""image-classification: labels and scores for images (PIL images, file paths, URLs, arrays)."""
from __future__ import annotations

import os
from typing import Any

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.scores import apply_function, check_function, check_top_k, default_function, label_scores


class ImageClassificationPipeline(Pipeline):
    """Output per image: [{"label", "score"}], best first, top_k of them (default 5)."""

    task = "image-classification"

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        if inputs is None and "images" in kwargs:
            inputs = kwargs.pop("images")
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, top_k=5, function_to_apply=None, timeout=None, **kwargs):
        if kwargs:
            raise TypeError(f"{self.task} pipeline got unknown arguments {sorted(kwargs)}; it takes top_k, "
                            "function_to_apply, timeout, batch_size")
        check_top_k(top_k)
        return {"timeout": timeout}, {}, {"top_k": top_k, "function": check_function(function_to_apply)}

    def preprocess(self, item, timeout=None) -> list[Chunk]:
        from loom.processing import load_image

        image = load_image(item, timeout=timeout) if isinstance(item, (str, os.PathLike, bytes)) else item
        pixels = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        return [Chunk({"pixel_values": pixels.to(self.dtype)})]

    def _forward(self, batch, **_):
        return {"logits": self.model(**batch).logits}

    def postprocess(self, chunks: list[Chunk], top_k=5, function=None) -> list[dict]:
        config = self.model.config
        scores = apply_function(chunks[0].outputs["logits"].float().numpy(), function or default_function(config))
        return label_scores(scores, config.id2label, min(top_k, config.num_labels) if top_k else top_k)
