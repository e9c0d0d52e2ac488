"""Pipelines for ready-made tasks, and generate() for decoder models (docs/guides/inference.md).

    python examples/inference.py
"""
from __future__ import annotations

import tempfile

import torch

from loom import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, pipeline

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def main() -> None:
    # 1. a pipeline: tokenize -> forward -> postprocess, batched, for a task name
    similarity = pipeline("sentence-similarity", model=MODEL)
    scores = similarity({"source_sentence": "A man is eating food.",
                         "sentences": ["A man eats bread.", "Stocks fell sharply.", "A woman plays violin."]})
    print("similarity:", [round(s, 3) for s in scores])
    assert scores[0] == max(scores)

    embed = pipeline("feature-extraction", model=MODEL, batch_size=2)
    vectors = embed(["first text", "second text", "third text"], pooling="mean")
    print("embeddings:", len(vectors), "x", len(vectors[0]))

    # 2. generate(): a decoder model (random weights here, so the tokens are arbitrary) with a GenerationConfig
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(MODEL)
        config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.cls_token_id,
                             eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp)

        tok.padding_side = "left"  # decoder batches pad on the left so every row continues from its last token
        enc = tok(["Once upon a time", "Hello"], return_tensors="pt", padding=True, return_token_type_ids=False)
        greedy = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        out = model.generate(**enc, generation_config=greedy)
        print("greedy new tokens:", out[:, enc["input_ids"].shape[1]:].tolist())
        assert out.shape[1] <= enc["input_ids"].shape[1] + 8

        # the KV cache makes decoding one token per step; the result is the same as without it
        no_cache = model.generate(**enc, generation_config=greedy, use_cache=False)
        assert torch.equal(out, no_cache)

        torch.manual_seed(0)
        sampled = model.generate(**enc, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9,
                                 pad_token_id=tok.pad_token_id)
        print("sampled new tokens:", sampled[:, enc["input_ids"].shape[1]:].tolist())


if __name__ == "__main__":
    main()
