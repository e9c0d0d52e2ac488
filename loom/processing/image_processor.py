"""Image processors: settings read from and written to preprocessor_config.json, and ViT's resize/crop/normalise."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from loom.hub_push import PushToHubMixin
from loom.processing import images as T
from loom.processing.features import BatchFeature

IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
IMAGENET_STANDARD_MEAN = [0.5, 0.5, 0.5]
IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]


def _size_dict(size, name: str) -> dict[str, int] | None:
    """The reference's size forms: an int (square), {"height", "width"}, or {"shortest_edge"}."""
    if size is None:
        return None
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and ({"height", "width"} <= set(size) or "shortest_edge" in size):
        return dict(size)
    raise ValueError(f"{name}={size!r} is not a size; use an int, (height, width), {{'height': H, 'width': W}} or "
                     "{'shortest_edge': S}")


class BaseImageProcessor(PushToHubMixin):
    """Holds the settings of preprocessor_config.json (unknown keys kept) and turns images into pixel_values."""

    model_input_names: ClassVar[list[str]] = ["pixel_values"]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("image_processor_type", None)
        kwargs.pop("feature_extractor_type", None)
        kwargs.pop("processor_class", None)
        settings = {**self.defaults, **kwargs}
        for key, value in settings.items():
            setattr(self, key, value)
        self.size = _size_dict(self.size, "size") if "size" in settings else None
        if "crop_size" in settings:
            self.crop_size = _size_dict(self.crop_size, "crop_size")

    # -- files ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> "BaseImageProcessor":
        return cls(**{**data, **kwargs})

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> "BaseImageProcessor":
        """Read preprocessor_config.json from a directory or hub id; keyword arguments override its settings."""
        return cls.from_dict(read_processor_config(path_or_id, kwargs), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        out["image_processor_type"] = type(self).__name__
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        from loom.utils import atomic_write_text

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / IMAGE_PROCESSOR_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return [str(path)]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"

    # -- processing -------------------------------------------------------------------------------------------
    def __call__(self, images, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, return_tensors: str | None = None, **overrides: Any) -> BatchFeature:
        """pixel_values for one image or a list of them; keyword arguments override the saved settings."""
        unknown = set(overrides) - set(vars(self)) - {"do_convert_rgb"}
        if unknown:
            raise TypeError(f"{type(self).__name__}.preprocess got unknown settings {sorted(unknown)}; known: "
                            f"{sorted(k for k in vars(self) if not k.startswith('_'))}")
        batch = images if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given: pass one image or a non-empty list of images")
        settings = {**{k: v for k, v in vars(self).items() if not k.startswith("_")}, **overrides}
        pixels = [self.process_one(T.to_chw_array(T.load_image(im) if isinstance(im, (str, os.PathLike, bytes))
                                                  else im, settings.get("do_convert_rgb") is not False), settings)
                  for im in batch]
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

    def process_one(self, image: np.ndarray, s: dict[str, Any]) -> np.ndarray:
        if s.get("do_resize") and s.get("size"):
            size = _size_dict(s["size"], "size")
            if "shortest_edge" in size:
                h, w = T.shortest_edge_size(image.shape[1], image.shape[2], size["shortest_edge"])
            else:
                h, w = size["height"], size["width"]
            image = T.resize(image, h, w, int(s.get("resample", 2) if s.get("resample") is not None else 2))
        if s.get("do_center_crop") and s.get("crop_size"):
            crop = _size_dict(s["crop_size"], "crop_size")
            image = T.center_crop(image, crop["height"], crop["width"])
        if s.get("do_rescale"):
            image = T.rescale(image, s.get("rescale_factor", 1 / 255))
        if s.get("do_normalize"):
            image = T.normalize(image, s["image_mean"], s["image_std"])
        return image


class ViTImageProcessor(BaseImageProcessor):
    """Resize to 224x224 (bilinear), rescale to [0, 1], normalise with mean = std = 0.5."""

    defaults = dict(do_resize=True, size={"height": 224, "width": 224}, resample=2, do_rescale=True,
                    rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_STANDARD_MEAN,
                    image_std=IMAGENET_STANDARD_STD)


def read_processor_config(path_or_id, kwargs: dict[str, Any], filename: str = IMAGE_PROCESSOR_NAME,
                          required: bool = True) -> dict[str, Any] | None:
    """Parse a processor JSON file of a model directory or hub id (hub keyword arguments are taken from kwargs)."""
    from loom.hub import pop_hub_kwargs, resolve_file

    path = resolve_file(path_or_id, filename, required=required, **pop_hub_kwargs(kwargs))
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise OSError(f"{path} is not valid JSON ({e}); fix or regenerate the file") from None
    if not isinstance(data, dict):
        raise OSError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data
