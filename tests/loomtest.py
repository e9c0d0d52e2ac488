"""Shared test helpers (a uniquely named module: every test folder has its own conftest, so `from conftest import`
would pick whichever was imported first)."""
from __future__ import annotations

import torch


def is_decoder_family(heads: dict) -> bool:
    """Whether a family's table of heads is a decoder's: a causal-LM head and no masked-LM head. BERT has both (an
    encoder that also runs as a decoder with is_decoder=True): the family tables test it as an encoder, and
    test_bert_decoder.py as a decoder."""
    return "causal-lm" in heads and "masked-lm" not in heads


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
    "olmo2": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    # multipliers away from 1 (values like Granite 3's) so that every family test exercises them
    "granite": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                    embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.25,
                    logits_scaling=8.0),
    # layer 1 is NoPE and sliding (window 4), with biases: every family test exercises them
    "smollm3": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                    no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4, attention_bias=True,
                    mlp_bias=True),
    # Gemma: head_dim 16 is not hidden_size / heads; Gemma 2/3 alternate a 4-token sliding layer with a global one,
    # scale queries by query_pre_attn_scalar != head_dim; Gemma 3 rotates its sliding layers with a local base and
    # its global layers with linear scaling
    "gemma": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    "gemma2": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                   sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
                   final_logit_softcapping=5.0),
    "gemma3_text": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=48, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, sliding_window=4, sliding_window_pattern=2,
                        query_pre_attn_scalar=12, rope_local_base_freq=100.0,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "phi3": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48, max_position_embeddings=64, partial_rotary_factor=0.5, sliding_window=5,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "phi": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=64, qk_layernorm=True, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
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
    "distilbert": dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64),
    "mpnet": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64),
    # DeBERTa-v3's settings: relative attention both ways over 8 log buckets (so a 12-token test reaches the
    # logarithmic ones), shared position keys, a normalised position table, no absolute positions
    "deberta-v2": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       max_position_embeddings=64, relative_attention=True, position_buckets=8,
                       pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                       position_biased_input=False),
    # ModernBERT: three layers (global, local, global); an 8-token window (+-4) that binds on 12-token inputs, a local
    # RoPE base different from the global one
    "modernbert": dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                       max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=2,
                       global_rope_theta=1000.0, local_rope_theta=100.0, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, cls_token_id=1, sep_token_id=2),
    # RoBERTa and its aliases: padding id 1, positions from 2 (so 64 positions hold 62 tokens)
    "roberta": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    max_position_embeddings=64, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "xlm-roberta": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2),
    "camembert": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                      max_position_embeddings=64, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                      eos_token_id=2),
    # embeddings narrower than the encoder, so every test runs the embeddings_project path
    "electra": dict(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=64, type_vocab_size=2),
    "vit": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                patch_size=8),
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


def check_padded_and_generate(ours, ref, ids, mask, new_tokens: int = 8) -> None:
    """Logits within 1e-4 of the reference at every real token of a left-padded batch (row 0 padded), and greedy
    generate token-identical."""
    import torch

    pad = int((mask[0] == 0).sum())
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[0, pad:], b[0, pad:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)
        kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
        assert ours.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()


def gemma_like_tokenizer(folder) -> None:
    """Write a small byte-fallback BPE in Gemma's tokenizer.json shape ('▁' for spaces, <bos> prepended; ids 0-3 are
    <pad>, <eos>, <bos>, <unk>) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world, a b c"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.save(str(folder / "tokenizer.json"))


def kernels_on() -> bool:
    from loom.kernels import build

    return build.available()


def run_at_level(code: str, level: str, *args: str) -> dict:
    """Run `code` (a script printing one JSON line last) in a fresh interpreter at kernel level `level` ("off" for
    the torch paths), so each level builds and loads its own library; return that JSON."""
    import json
    import os
    import subprocess
    import sys

    from loom.kernels import build

    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, build.ENV: level})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def runs_at_levels(code: str, *args: str, levels=None) -> dict:
    """`run_at_level` at each of `levels` (by default every level this machine supports) and with the kernels off,
    each run checked to say it ran there (its JSON's "describe" is build.describe()); {level or "off": JSON}."""
    from loom.kernels import build

    runs = {}
    for level in [*(build.supported_levels() if levels is None else levels), "off"]:
        run = runs[level] = run_at_level(code, level, *args)
        if level == "off":
            assert run["describe"].startswith("off"), run["describe"]
        else:
            assert run["describe"] == f"on ({level})", run["describe"]
    return runs


def kernels_off_for(monkeypatch) -> None:
    """Make this test run as on a machine where loom's C kernels cannot be built (the torch paths)."""
    from loom.kernels import build

    monkeypatch.setattr(build, "_state", {"lib": None, "on": False, "level": None, "why": "off for this test"})


def quantized_tolerance(model) -> dict:
    """assert_close tolerances for the logits of a model with loom's quantized Linears against float math on the
    same dequantized weights: loom's native kernels and the dequantize path differ by float rounding only (1e-4);
    fbgemm's int8 kernel (used where loom's kernels are off) puts activations on a grid of ~1/16000 of their range,
    up to ~1e-3 on the tiny test models' logits."""
    fbgemm = any(getattr(m, "kernel", None) == "fbgemm_int8" for m in model.modules())
    return dict(atol=2e-3, rtol=1e-3) if fbgemm else dict(atol=1e-4, rtol=1e-4)
