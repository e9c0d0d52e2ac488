"""Shared test helpers (a uniquely named module: every test folder has its own conftest, so `from conftest import`
would pick whichever was imported first)."""
from __future__ import annotations

import torch

TINY = {
    "bert": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64, type_vocab_size=2),
    "gpt2": dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "llama": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, max_position_embeddings=64, sliding_window=4, bos_token_id=1,
                    eos_token_id=2),
    "qwen2": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    "qwen3": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    "mixtral": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                    bos_token_id=1, eos_token_id=2),
    # three layers: experts on 0 and 2, a dense MLP on 1 (mlp_only_layers)
    "qwen2_moe": dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2),
    "qwen3_moe": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
}


def reference_checkpoint(tmp_path_factory, model_type: str, ref_class: str, seed: int = 0, **overrides):
    """Build a random reference model of `ref_class`, save it, return (directory, reference model in eval mode)."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **{**TINY[model_type], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, ref_class)(config).eval()
    path = tmp_path_factory.mktemp(f"{ref_class}")
    model.save_pretrained(path)
    return path, model


def kernels_on() -> bool:
    from loom.kernels import build

    return build.available()


def kernels_off_for(monkeypatch) -> None:
    """Make this test run as on a machine where loom's C kernels cannot be built (the torch paths)."""
    from loom.kernels import build

    monkeypatch.setattr(build, "_state", {"lib": None, "on": False, "level": None, "why": "off for this test"})
