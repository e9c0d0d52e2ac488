"""Chat templates: rendering equal to the reference, no double BOS, assistant masks, the sandbox."""
from __future__ import annotations

import pytest

from tok_data import CHATML_TEMPLATE

MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell a joke"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("template", [None, CHATML_TEMPLATE])
@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_rendering_equals_reference(loom_tok, reference, template, generation_prompt, tools):
    tok, ref = loom_tok("llama3_chat"), reference("llama3_chat")
    options = dict(chat_template=template, add_generation_prompt=generation_prompt, tools=tools)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, **options)
    assert text == ref.apply_chat_template(MESSAGES, tokenize=False, **options)
    assert tok.apply_chat_template(MESSAGES, **options)["input_ids"] == \
           ref.apply_chat_template(MESSAGES, **options)["input_ids"]
    batch = [MESSAGES, MESSAGES[:2]]
    assert tok.apply_chat_template(batch, tokenize=False, **options) == \
           ref.apply_chat_template(batch, tokenize=False, **options)


def test_no_double_bos(loom_tok):
    tok = loom_tok("llama3_chat")
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the post-processor adds BOS to plain text
    ids = tok.apply_chat_template(MESSAGES, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_continue_final_message(loom_tok, reference):
    tok, ref = loom_tok("llama3_chat"), reference("llama3_chat")
    chat = MESSAGES[:2] + [{"role": "assistant", "content": "Sure, here is"}]
    ours = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert ours == ref.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert ours.endswith("Sure, here is")
    with pytest.raises(ValueError, match="cannot both be set"):
        tok.apply_chat_template(chat, continue_final_message=True, add_generation_prompt=True)


def test_assistant_tokens_mask(loom_tok, reference):
    tok, ref = loom_tok("llama3_chat"), reference("llama3_chat")
    ours = tok.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True)
    theirs = ref.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True)
    assert ours["assistant_masks"] == theirs["assistant_masks"] and sum(ours["assistant_masks"]) > 3
    marked = [i for i, m in zip(ours["input_ids"], ours["assistant_masks"]) if m]
    assert tok.decode(marked) == "Hello! How can I help?<|eot_id|>"
    batch = tok.apply_chat_template([MESSAGES, MESSAGES[:3]], return_assistant_tokens_mask=True)
    assert [len(m) for m in batch["assistant_masks"]] == [len(i) for i in batch["input_ids"]]
    assert batch["assistant_masks"][0] == ours["assistant_masks"]
    with pytest.raises(ValueError, match="generation"):
        tok.apply_chat_template(MESSAGES, chat_template=CHATML_TEMPLATE, return_assistant_tokens_mask=True)


@pytest.mark.parametrize("attack", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__ }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",
    "{{ raise_exception('refused by template') }}",
])
def test_sandbox_refuses_python_internals(loom_tok, attack):
    import jinja2

    with pytest.raises((jinja2.exceptions.SecurityError, jinja2.exceptions.TemplateError, jinja2.exceptions.UndefinedError)):
        loom_tok("llama3_chat").apply_chat_template(MESSAGES, chat_template=attack, tokenize=False)


def test_missing_template_and_bad_messages(loom_tok):
    with pytest.raises(ValueError, match="no chat template"):
        loom_tok("minilm").apply_chat_template(MESSAGES)
    with pytest.raises(TypeError, match="chat message 0 must be a dict"):
        loom_tok("llama3_chat").apply_chat_template(["just a string"])
    with pytest.raises(ValueError, match="empty conversation"):
        loom_tok("llama3_chat").apply_chat_template([])
    with pytest.raises(ValueError, match="not valid Jinja"):
        loom_tok("llama3_chat").apply_chat_template(MESSAGES, chat_template="{% for %}")
