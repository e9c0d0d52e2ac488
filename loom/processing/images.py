"""Image loading and the array transforms of image processors (Pillow + numpy; no torchvision).

Arrays are channels-first (C, H, W) from `to_chw_array` on. Resizing goes through Pillow on uint8 pixels, which is
what the reference's Pillow backend does, so results agree to the last bit on uint8 inputs.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from loom.utils import require

RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def load_image(image: Any, timeout: float | None = None):
    """A PIL image from a PIL image, a file path, an http(s) URL, or raw bytes; errors name what was wrong."""
    Image = require("PIL.Image", "loading images", "pillow")
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return _open(io.BytesIO(image), "the given bytes")
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        if name.startswith(("http://", "https://")):
            import urllib.request

            try:
                with urllib.request.urlopen(name, timeout=timeout) as response:
                    return _open(io.BytesIO(response.read()), name)
            except OSError as e:
                raise OSError(f"could not download the image {name}: {e}") from None
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image file {name!r} does not exist; pass a path to an image file, a URL, "
                                    "a PIL image or an array")
        return _open(path, name)
    raise TypeError(f"cannot read an image from {type(image).__name__}; pass a PIL image, a file path, a URL, "
                    "a numpy array or a torch tensor")


def _open(source, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(source)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{name} is not an image Pillow can read ({e}); pass a PNG, JPEG, ... file") from None
    return image


def to_chw_array(image: Any, convert_rgb: bool = True) -> np.ndarray:
    """(C, H, W) numpy array from a PIL image, an (H, W, C) / (C, H, W) / (H, W) array or a torch tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image)
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"cannot use {type(image).__name__} as an image; pass a PIL image, a file path or an array")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions (H, W[, C]), got shape {image.shape}")
    if image.shape[0] not in (1, 3, 4) and image.shape[-1] in (1, 3, 4):
        image = np.moveaxis(image, -1, 0)
    if convert_rgb and image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    elif convert_rgb and image.shape[0] == 4:
        image = image[:3]
    return image


def _as_uint8(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """uint8 pixels for Pillow, and whether they were scaled up from [0, 1] floats (to scale back after)."""
    if image.dtype == np.uint8:
        return image, False
    if np.allclose(image, np.round(image)):
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"image values lie in [{image.min()}, {image.max()}], outside the 0..255 pixel range")
        return image.astype(np.uint8), False
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"float image values lie in [{image.min()}, {image.max()}]; floats must be in [0, 1]")
    return (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True


def resize(image: np.ndarray, height: int, width: int, resample: int = 2) -> np.ndarray:
    """Resize a (C, H, W) array with Pillow's filter number `resample` (2 = bilinear)."""
    from PIL import Image

    pixels, scaled = _as_uint8(image)
    hwc = np.moveaxis(pixels, 0, -1)
    pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    out = np.asarray(pil.resize((width, height), resample=Image.Resampling(resample)))
    out = out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)
    return out.astype(np.float32) / 255 if scaled else out


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(H, W) with the short side at `shortest` and the aspect ratio kept (the long side rounded down)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop the centre (H, W) of a (C, H, W) array, padding with zeros where the image is smaller."""
    _, h, w = image.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[:, top:top + height, left:left + width]
    out = np.zeros((image.shape[0], max(h, height), max(w, width)), dtype=image.dtype)
    pad_top, pad_left = max(0, -top), max(0, -left)
    out[:, pad_top:pad_top + h, pad_left:pad_left + w] = image
    top, left = max(0, top), max(0, left)
    return out[:, top:top + height, left:left + width]


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    return (image.astype(np.float64) * factor).astype(np.float32)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    image = image if np.issubdtype(image.dtype, np.floating) else image.astype(np.float32)
    c = image.shape[0]
    mean = np.array(mean if isinstance(mean, (list, tuple)) else [mean] * c, dtype=image.dtype)
    std = np.array(std if isinstance(std, (list, tuple)) else [std] * c, dtype=image.dtype)
    if len(mean) != c or len(std) != c:
        raise ValueError(f"image_mean/image_std have {len(mean)}/{len(std)} values but the image has {c} channels")
    return (image - mean[:, None, None]) / std[:, None, None]
