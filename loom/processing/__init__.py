"""Processors: turn raw inputs (images; text through the tokenizer) into model inputs."""
from loom.processing.auto import AutoImageProcessor, AutoProcessor, ProcessorMixin
from loom.processing.features import BatchFeature
from loom.processing.image_processor import BaseImageProcessor, ViTImageProcessor
from loom.processing.images import load_image

__all__ = ["AutoImageProcessor", "AutoProcessor", "BaseImageProcessor", "BatchFeature", "ProcessorMixin",
           "ViTImageProcessor", "load_image"]
