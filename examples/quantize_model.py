"""Quantize while loading (int8 / int4 built in, bitsandbytes when installed), quantize a model in memory, save and
reload the quantized checkpoint (docs/guides/quantization.md).

    python examples/quantize_model.py
"""
from __future__ import annotations

import tempfile

import torch

from loom import AutoModel, AutoTokenizer, BitsAndBytesConfig, WeightOnlyConfig, quantize_

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["A man is eating food.", "Shares dropped on the stock exchange.", "The girl is carrying a baby."]


def embed(model, tok) -> torch.Tensor:
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def weight_mib(model) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def main() -> None:
    tok = AutoTokenizer.from_pretrained(MODEL)
    reference = AutoModel.from_pretrained(MODEL)
    ref = embed(reference, tok)

    configs = {"int8": WeightOnlyConfig(bits=8), "int4 (group 128)": WeightOnlyConfig(bits=4, group_size=128)}
    try:
        import bitsandbytes  # noqa: F401  (optional: pip install bitsandbytes)

        configs["bnb nf4"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype=torch.float32)
    except ImportError:
        print("bitsandbytes is not installed: skipping BitsAndBytesConfig")

    print(f"fp32: {weight_mib(reference):.1f} MiB")
    for name, config in configs.items():
        model = AutoModel.from_pretrained(MODEL, quantization_config=config)  # quantized while streaming in
        cosine = (embed(model, tok) * ref).sum(1).min().item()
        print(f"{name}: {weight_mib(model):.1f} MiB, worst cosine to fp32 {cosine:.4f}")
        assert cosine > 0.9

    # a model already in memory: quantize_ swaps its Linear layers in place
    model = AutoModel.from_pretrained(MODEL)
    quantize_(model, WeightOnlyConfig(bits=8))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # compressed-tensors pack-quantized int8: the reference reads it too
        reloaded = AutoModel.from_pretrained(tmp)  # comes back quantized, no config needed
        assert torch.allclose(embed(reloaded, tok), embed(model, tok), atol=1e-6)
        print("saved and reloaded the int8 checkpoint")


if __name__ == "__main__":
    main()
