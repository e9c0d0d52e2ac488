"""Tokenize a batch for a model, read the result, decode it, and render a chat (docs/guides/tokenization.md).

    python examples/tokenize_texts.py
"""
from __future__ import annotations

from loom import AutoTokenizer

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def main() -> None:
    tok = AutoTokenizer.from_pretrained(MODEL)
    texts = ["A man is eating food.", "Tokenizers split text into pieces the model knows: naïve café!"]

    # one call for the whole batch: pad to the longest, cut at max_length, return torch tensors
    batch = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    print({k: tuple(v.shape) for k, v in batch.items()})
    print(tok.convert_ids_to_tokens(batch["input_ids"][1].tolist()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the short text is padded

    # decode back to text (the uncased WordPiece vocabulary lower-cases and strips accents)
    decoded = tok.decode(batch["input_ids"][0], skip_special_tokens=True)
    print(decoded)
    assert decoded == "a man is eating food."

    # offsets map tokens back to characters, e.g. for highlighting
    enc = tok(texts[0], return_offsets_mapping=True)
    print([texts[0][a:b] for a, b in enc["offset_mapping"] if b > a])

    # decoder models pad on the left for generation; chat templates render a conversation into the prompt
    tok.padding_side = "left"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], chat_template=CHAT_TEMPLATE,
                                     add_generation_prompt=True, tokenize=False)
    print(repr(prompt))
    assert prompt.endswith("<assistant> ")


if __name__ == "__main__":
    main()
