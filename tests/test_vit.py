"""ViT model, ViT image processor and the image-classification pipeline against the reference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import loom

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
           patch_size=8, initializer_range=0.5)
LABELS = {0: "cat", 1: "dog", 2: "bird"}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.ViTConfig(**VIT, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit")
    transformers.ViTForImageClassification(config).eval().save_pretrained(path)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 70), (300, 200),
                                                                                           (32, 32)]]


def test_model_parity(vit_dir):
    import transformers

    x = torch.randn(2, 3, 32, 32)
    ours = loom.ViTForImageClassification.from_pretrained(vit_dir)
    ref = transformers.ViTForImageClassification.from_pretrained(vit_dir).eval()
    torch.testing.assert_close(ours(x).logits, ref(pixel_values=x).logits, rtol=1e-5, atol=1e-5)
    big = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(ours(big, interpolate_pos_encoding=True).logits,
                               ref(pixel_values=big, interpolate_pos_encoding=True).logits, rtol=1e-5, atol=1e-5)
    base, ref_base = loom.ViTModel.from_pretrained(vit_dir), transformers.ViTModel.from_pretrained(vit_dir).eval()
    torch.testing.assert_close(base(x).last_hidden_state, ref_base(pixel_values=x).last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match the model's image_size"):
        ours(big)


def test_saved_checkpoint_loads_in_reference(vit_dir, tmp_path):
    import transformers

    ours = loom.ViTForImageClassification.from_pretrained(vit_dir)
    ours.save_pretrained(tmp_path)
    ref = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ours(x).logits, ref(pixel_values=x).logits)


def test_image_processor_parity(vit_dir, images):
    import transformers

    ours = loom.AutoImageProcessor.from_pretrained(vit_dir)
    ref = transformers.AutoImageProcessor.from_pretrained(vit_dir)
    assert isinstance(ours, loom.ViTImageProcessor)
    np.testing.assert_array_equal(ours(images, return_tensors="pt")["pixel_values"].numpy(),
                                  ref(images, return_tensors="pt")["pixel_values"].numpy())
    floats = np.random.default_rng(1).random((3, 40, 60)).astype(np.float32)
    np.testing.assert_allclose(ours(floats, return_tensors="np")["pixel_values"],
                               ref(floats, return_tensors="np")["pixel_values"], atol=1e-6)


def test_processor_round_trip(vit_dir, tmp_path):
    proc = loom.AutoProcessor.from_pretrained(vit_dir)
    assert isinstance(proc, loom.ViTImageProcessor)
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ViTImageProcessor" and saved["size"] == {"height": 32, "width": 32}


def test_image_classification_matches_reference(vit_dir, images, tmp_path):
    import transformers

    ours = loom.pipeline("image-classification", model=str(vit_dir))
    ref = transformers.pipeline("image-classification", model=str(vit_dir), device="cpu")
    for a, b in zip(ours(images, batch_size=8), ref(images)):
        assert [x["label"] for x in a] == [x["label"] for x in b]
        np.testing.assert_allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-4)
    path = tmp_path / "photo.png"
    images[0].save(path)
    assert ours(str(path), top_k=1)[0]["label"] == ours(images[0], top_k=1)[0]["label"]


def test_file_that_is_not_an_image(vit_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    pipe = loom.pipeline("image-classification", model=str(vit_dir))
    with pytest.raises(ValueError, match="is not an image Pillow can read"):
        pipe(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe(str(tmp_path / "missing.jpg"))
