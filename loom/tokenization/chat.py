"""Chat templates: render conversations with Jinja2 in a sandbox, then tokenize without adding special tokens.

Templates come from model repositories, so they are untrusted code: they run in jinja2's
ImmutableSandboxedEnvironment (no access to Python internals, no mutation of inputs), and everything they can see
is rebuilt from plain JSON-like values first. The rendered text already holds the template's BOS, so it is encoded
with add_special_tokens=False (no double BOS). `{% generation %}...{% endgeneration %}` blocks mark assistant text
for return_assistant_tokens_mask.
"""
from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

from .tool_schema import get_json_schema

CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_tracking: ContextVar = ContextVar("loom_generation_tracking", default=None)


def _plain(value):
    """Rebuild a value from JSON-like types; anything else becomes an inert '<TypeName>' placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())  # numpy / torch scalars
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=32)
def compile_template(template: str):
    """Compile a chat template in the sandboxed environment (cached per template text)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        """`{% generation %}...{% endgeneration %}`: records where assistant text lands in the output."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            state = _tracking.get()
            if state is not None:
                chunks, spans = state
                start = sum(len(c) for c in chunks)
                spans.append((start, start + len(text)))
            return text

    class Namespace(jinja2.utils.Namespace):
        # namespaces may not hold underscore names: they are the way into Python internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates may not set the attribute {name!r} on a "
                                                      "namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not want
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e} (line {e.lineno})") from None


def select_template(tok, chat_template: str | None, tools) -> str:
    """The template text: a name in the tokenizer's templates, an explicit template, or the default."""
    templates = tok.chat_template
    if isinstance(templates, dict):
        if chat_template is not None:
            return templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ValueError(f"this tokenizer has several chat templates {list(templates)} and none is 'default'; "
                         "pass chat_template='<name>'")
    if chat_template is not None:
        return chat_template
    if templates is None:
        raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or "
                         "chat_template.jinja); pass chat_template='...' or set tok.chat_template")
    return templates


def _messages(conversation) -> list[dict]:
    messages = getattr(conversation, "messages", conversation)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"chat message {i} must be a dict like {{'role': 'user', 'content': '...'}}, got "
                            f"{type(message).__name__}")
        out.append({k: v for k, v in message.items() if v is not None})  # a None content renders as "None"
    return out


def _tool_schemas(tools):
    """JSON schemas as given; Python functions and methods converted from their type hints and docstrings."""
    if tools is None:
        return None
    schemas = []
    for i, tool in enumerate(tools):
        if isinstance(tool, Mapping):
            schemas.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            schemas.append(get_json_schema(tool))
        else:
            raise TypeError(f"tools[{i}] must be a JSON schema (a dict) or a Python function with type hints and a "
                            f"Google-style docstring, got {type(tool).__name__}")
    return _plain(schemas)


def _mark_continuation(chat: list[dict], field: str) -> str:
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message is set but the final message has no '{field}' to continue")
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                text = block["text"]
                block["text"] = text + CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text block to continue")
    chat[-1][field] = final + CONTINUE_TAG
    return final


def _cut_at_continuation(rendered: str, final: str) -> str:
    if final.strip() not in rendered or CONTINUE_TAG.strip() not in rendered:
        raise ValueError("continue_final_message is set but the chat template dropped part of the final message, "
                         "so the rendered chat cannot end with it")
    at = rendered.rindex(CONTINUE_TAG.strip())
    return rendered[:at] if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:at].rstrip()


def render(template: str, conversations: list[list[dict]], *, tools=None, documents=None,
           add_generation_prompt: bool = False, continue_final_message=False, track_generation: bool = False,
           **template_kwargs) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Render each conversation; also return the character spans of `{% generation %}` blocks when tracking."""
    compiled = compile_template(template)
    tools, documents, template_kwargs = _tool_schemas(tools), _plain(documents), _plain(template_kwargs)
    rendered, all_spans = [], []
    for chat in conversations:
        chat = _plain(chat)
        final = None
        if continue_final_message:
            if not chat:
                raise ValueError("continue_final_message is set but the conversation is empty")
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            if field not in template:
                raise ValueError(f"continue_final_message is set to {field!r} but the chat template never reads it")
            final = _mark_continuation(chat, field)
        variables = dict(template_kwargs, messages=chat, tools=tools, documents=documents,
                         add_generation_prompt=add_generation_prompt)
        spans: list[tuple[int, int]] = []
        if track_generation:
            chunks: list[str] = []
            token = _tracking.set((chunks, spans))
            try:
                for chunk in compiled.generate(**variables):
                    chunks.append(chunk)
            finally:
                _tracking.reset(token)
            text = "".join(chunks)
        else:
            text = compiled.render(**variables)
        if final is not None:
            text = _cut_at_continuation(text, final)
        rendered.append(text)
        all_spans.append(spans)
    return rendered, all_spans


def assistant_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token that overlaps a generation span (so a span cut by truncation keeps its tokens)."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask


def apply_chat_template(tok, conversation, *, tools=None, documents=None, chat_template=None,
                        add_generation_prompt=False, continue_final_message=False, tokenize=True, padding=False,
                        truncation=False, max_length=None, return_tensors=None, return_dict=True,
                        return_assistant_tokens_mask=False, tokenizer_kwargs=None, **kwargs):
    """See PreTrainedTokenizerFast.apply_chat_template."""
    if not tokenize:
        return_dict = False
    if return_assistant_tokens_mask and not (tokenize and return_dict):
        raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set: the first continues "
                         "the last message, the second starts a new assistant message")
    if continue_final_message and return_assistant_tokens_mask:
        raise ValueError("continue_final_message cannot be combined with return_assistant_tokens_mask")
    template = select_template(tok, chat_template, tools)
    if return_assistant_tokens_mask and not re.search(r"\{%-?\s*generation\s*-?%\}", template):
        raise ValueError("return_assistant_tokens_mask=True needs a chat template with {% generation %} blocks "
                         "around assistant text; this template has none")
    if isinstance(conversation, (list, tuple)) and not conversation:
        raise ValueError("cannot apply a chat template to an empty conversation; pass at least one message")
    batched = isinstance(conversation, (list, tuple)) and (
        isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
    conversations = [_messages(c) for c in (conversation if batched else [conversation])]
    rendered, spans = render(template, conversations, tools=tools, documents=documents,
                             add_generation_prompt=add_generation_prompt,
                             continue_final_message=continue_final_message,
                             track_generation=return_assistant_tokens_mask, **{**tok.special_tokens_map, **kwargs})
    if not tokenize:
        return rendered if batched else rendered[0]
    out = tok(rendered if batched else rendered[0], padding=padding, truncation=truncation, max_length=max_length,
              add_special_tokens=False, return_tensors=return_tensors, **(tokenizer_kwargs or {}))
    if not return_dict:
        return out["input_ids"]
    if return_assistant_tokens_mask:
        masks = [assistant_mask(e.offsets, s) for e, s in zip(out.encodings, spans)]
        if return_tensors:
            from .batch_encoding import _to_tensor

            out["assistant_masks"] = _to_tensor("assistant_masks", masks, return_tensors)
        else:
            out["assistant_masks"] = masks if batched else masks[0]
    return out
