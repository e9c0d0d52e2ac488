"""Texts and templates shared by the tokenization tests (a uniquely named module, see tests/loomtest.py)."""

CORPUS = [
    "Hello world!", "The quick brown fox jumps over the lazy dog.", "Héllo wörld, ça va? naïve café résumé",
    "東京は日本の首都です。", "北京欢迎你", "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧", "e\u0301 combining a\u0308 marks",
    "repeated    spaces   here", "tabs\tand\nnewlines\r\nmixed", "", " ", "  leading and trailing  ",
    "Numbers 1234567 and 3.14159, dates 2024-01-01.", "URL: https://example.com/path?q=1&x=2",
    "don't won't it's we're they've I'm you'll he'd", "ALL CAPS SHOUTING", "Straße GROẞE ǅ ß",
    "Special <s> and </s> and [SEP] [CLS] <|endoftext|> <|begin_of_text|> inside",
    "Ελληνικά κείμενα και русский текст", "مرحبا بالعالم", "हिन्दी पाठ", "a" * 50,
    " ".join(f"long sentence number {i} with words" for i in range(60)),
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if tools %}{{ '<|start_header_id|>tools<|end_header_id|>\n\n' + (tools | tojson) + '<|eot_id|>' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if tools %}{% for tool in tools %}{{ tool['function']['name'] }}\n{% endfor %}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
