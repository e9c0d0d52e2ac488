"""Context parallelism on the families whose attention is not Llama's plain q/k/v: Qwen3 (per-head q/k norms), OLMo 2
(whole-projection q/k norms), Phi-3 (fused qkv, partial rotary), SmolLM3 (NoPE layers), Granite (attention
multiplier): loss and gradients under cp=2 equal one process's. Before, cp re-implemented the projections and
silently skipped the norms."""
from __future__ import annotations

import pytest
import torch

import dist_helpers as H
from loom import AutoModelForCausalLM
from loomtest import TINY, reference_checkpoint

pytestmark = pytest.mark.timeout(300)
FAMILIES = {"qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM",
            "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM"}
NO_WINDOW = {"sliding_window": None, "use_sliding_window": False}  # cp refuses sliding windows


def test_cp_matches_one_process_on_other_attentions(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_families")
    paths = [str(reference_checkpoint(tmp_path_factory, t, cls, **{k: v for k, v in NO_WINDOW.items()
                                                                   if k in TINY[t] or t == "phi3"})[0])
             for t, cls in FAMILIES.items()]
    H.launch(2, root, "families", *paths, script="cp_families_script.py", timeout=240)
    got = torch.load(root / "cp_families.pt", weights_only=True)
    batch = H.collate(H.dataset(2))
    for (model_type, _), path in zip(FAMILIES.items(), paths):
        model = AutoModelForCausalLM.from_pretrained(path).train()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        torch.testing.assert_close(got[path]["loss"], out.loss.detach(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{model_type} loss: {m}")
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[path]["grads"][name], p.grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{model_type} {name}: {m}")
