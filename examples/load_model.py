"""Load a checkpoint, pick its dtype and placement, save it, and load it back (docs/guides/loading.md).

    python examples/load_model.py        (from the repository root, with loom installed or PYTHONPATH=.)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from loom import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # packaged with loom's test assets, resolvable offline


def main() -> None:
    # 1. by hub id (or a directory): fp32 as stored, or straight into bfloat16 without an fp32 copy in memory
    config = AutoConfig.from_pretrained(MODEL)
    model = AutoModel.from_pretrained(MODEL)
    half = AutoModel.from_pretrained(MODEL, dtype=torch.bfloat16)
    print(f"{config.model_type}: {model.num_parameters() / 1e6:.1f}M parameters, {model.dtype} -> {half.dtype}")

    with tempfile.TemporaryDirectory() as tmp:
        # 2. save_pretrained writes config.json + model.safetensors (sharded above max_shard_size)
        model.save_pretrained(Path(tmp) / "minilm", max_shard_size="20MB")
        print("saved:", sorted(p.name for p in (Path(tmp) / "minilm").iterdir()))
        again = AutoModel.from_pretrained(Path(tmp) / "minilm")
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
        print("round trip identical:", same)
        assert same

        # 3. device_map: a dict of module prefixes -> device; "" covers everything not named.
        #    "disk" needs offload_folder (and accelerate, which runs the offloaded layers)
        torch.manual_seed(0)
        small = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)
        LlamaForCausalLM(small).save_pretrained(Path(tmp) / "llama")
        device_map = {"model.layers.2": "disk", "model.layers.3": "disk", "": "cpu"}
        offloaded = AutoModelForCausalLM.from_pretrained(Path(tmp) / "llama", device_map=device_map,
                                                         offload_folder=Path(tmp) / "offload")
        full = AutoModelForCausalLM.from_pretrained(Path(tmp) / "llama")
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.inference_mode():
            diff = (offloaded(input_ids=ids).logits - full(input_ids=ids).logits).abs().max().item()
        print(f"layers 2-3 on disk, same logits as in memory: max diff {diff:.1e}")
        assert diff < 1e-5


if __name__ == "__main__":
    main()
