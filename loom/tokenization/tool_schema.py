"""Python functions as chat-template tools: type hints + a Google-style docstring -> the JSON schema templates read.

`get_json_schema(func)` gives `{"type": "function", "function": {"name", "description", "parameters", "return"?}}`
in the reference's layout and key order (templates render it with `tojson`, so order shows in the prompt):
- the description is the docstring text before its first `Args:`, `Returns:` or `Raises:`;
- each argument needs a type hint and an `Args:` entry (`name: text` or `name (type): text`, continuation lines
  indented deeper); a trailing `(choices: [...])` in an entry becomes an `enum`;
- arguments without a default are `required`; `self`/`cls` without a hint are skipped (methods);
- a return hint that converts, with the `Returns:` text as its description, goes under "return".
Hints map as int/float/str/bool/None -> integer/number/string/boolean/null, list/tuple -> array (`items`,
`prefixItems`), dict -> object (`additionalProperties`), Any -> {}, Literal and Enum -> enum, Optional -> nullable,
other unions -> a type list or `anyOf`; PIL images -> image and torch tensors -> audio, as in the reference.
"""
from __future__ import annotations

import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from enum import Enum


class TypeHintParsingException(TypeError):
    """A tool function's type hint is missing or has no JSON schema equivalent."""


class DocstringParsingException(ValueError):
    """A tool function's docstring is missing or does not describe every argument."""


_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_CONTAINERS = {list: "array", tuple: "array", dict: "object"}
_SECTION_HEADS = r"(?:Args:|Returns:|Raises:)"
_DESCRIPTION = re.compile(rf"^(.*?)\s*(?:{_SECTION_HEADS}|\Z)", re.DOTALL)
_ARGS_BLOCK = re.compile(r"\n\s*Args:\n(.*?)\s*(?:Returns:|Raises:|\Z)", re.DOTALL)
_RETURNS_BLOCK = re.compile(r"\n\s*Returns:\n\s*(.*?)\s*(?:Raises:|\Z)", re.DOTALL)
_ARG_LINE = re.compile(r"([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*(.*)")
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)


def _enum_schema(values: list, what: str) -> dict:
    if any(type(v) not in _SCALARS for v in values):
        raise TypeHintParsingException(f"{what} has values {values!r} that are not JSON scalars; use int, float, "
                                       "str, bool or None values")
    kinds = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _bare_type_schema(hint) -> dict | None:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if hint in _CONTAINERS:
        return {"type": _CONTAINERS[hint]}
    if hint is typing.Any:
        return {}
    # only look for the media types if their libraries are already in use: a plain tool never imports them
    image = getattr(sys.modules.get("PIL.Image"), "Image", None)
    if image is not None and hint is image:
        return {"type": "image"}
    torch = sys.modules.get("torch")
    if torch is not None and hint is torch.Tensor:
        return {"type": "audio"}
    return None


def hint_schema(hint, where: str) -> dict:
    """The JSON schema of one type hint; `where` names the argument for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None:
        if isinstance(hint, type) and issubclass(hint, Enum):
            values = [member.value for member in hint]
            if not values:
                raise TypeHintParsingException(f"{where}: the Enum {hint.__name__} has no members")
            return _enum_schema(values, f"{where}: the Enum {hint.__name__}")
        schema = _bare_type_schema(hint)
        if schema is None:
            raise TypeHintParsingException(
                f"{where}: the type hint {hint!r} has no JSON schema equivalent (a custom class?); use int, float, "
                "str, bool, Enum, Literal, or list/tuple/dict/Union of those, or pass a hand-written JSON schema "
                "dict as the tool instead of the function")
        return schema
    if origin is typing.Union or origin is types.UnionType:
        members = [hint_schema(a, where) for a in args if a is not type(None)]
        if len(members) == 1:
            schema = members[0]
        elif all(m.keys() == {"type"} and isinstance(m["type"], str) for m in members):
            names = sorted({m["type"] for m in members})
            schema = {"type": names[0] if len(names) == 1 else names}
        else:
            schema = {"anyOf": members}
        if type(None) in args:
            schema["nullable"] = True
        return schema
    if origin is typing.Literal and args:
        return _enum_schema(list(args), f"{where}: the Literal")
    if origin is list:
        return {"type": "array", "items": hint_schema(args[0], where)} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1:
            raise TypeHintParsingException(f"{where}: a one-element tuple hint {hint} is not converted; use "
                                           "list[...] for several values, or the element type for one")
        if ... in args:
            raise TypeHintParsingException(f"{where}: tuple[..., ...] (variable length) is not converted; use "
                                           "list[...] instead")
        return {"type": "array", "prefixItems": [hint_schema(a, where) for a in args]}
    if origin is dict:
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = hint_schema(args[1], where)
        return schema
    raise TypeHintParsingException(f"{where}: the type hint {hint!r} has no JSON schema equivalent")


def parse_docstring(doc: str) -> tuple[str | None, dict[str, str], str | None]:
    """(description, {argument: text}, returns text) of a Google-style docstring."""
    description = _DESCRIPTION.search(doc)
    returns = _RETURNS_BLOCK.search(doc)
    block = _ARGS_BLOCK.search(doc)
    entries: list[tuple[str, str, list[str]]] = []
    if block is not None:
        for line in block.group(1).split("\n"):
            if not line.strip():
                continue
            match = _ARG_LINE.fullmatch(line)
            # a "name:" line starts a new argument unless it is indented deeper than the current one
            if match and not (entries and line.startswith(entries[-1][0]) and line[len(entries[-1][0])] in " \t"):
                entries.append((match.group(1), match.group(2), [match.group(3)]))
            elif entries:
                entries[-1][2].append(line)
    arguments = {name: re.sub(r"\s*\n+\s*", " ", "\n".join(lines).strip()) for _, name, lines in entries}
    return (description.group(1).strip() if description else None, arguments,
            returns.group(1).strip() if returns else None)


def _parameters(func: Callable, name: str) -> tuple[dict, dict | None]:
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    if params and params[0].name in ("self", "cls") and params[0].annotation is inspect.Parameter.empty:
        params = params[1:]
    for param in params:
        if param.annotation is inspect.Parameter.empty:
            raise TypeHintParsingException(f"tool function {name}: argument '{param.name}' has no type hint; add "
                                           f"one (e.g. `{param.name}: str`) so it can be described to the model")
    try:
        hints = typing.get_type_hints(func)
    except NameError as e:  # a string annotation naming something not importable where the function lives
        raise TypeHintParsingException(f"tool function {name}: its type hints cannot be evaluated ({e})") from None
    names = {p.name for p in params}
    properties = {k: hint_schema(v, f"tool function {name}, argument '{k}'") for k, v in hints.items() if k in names}
    schema = {"type": "object", "properties": properties}
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    if required:
        schema["required"] = required
    returns = None
    if "return" in hints:
        try:
            returns = hint_schema(hints["return"], f"tool function {name}, return value")
        except TypeHintParsingException:
            pass  # the model never produces the return value, so an unconvertible one is left out
    return schema, returns


def get_json_schema(func: Callable) -> dict:
    """The tool schema of a function with type hints and a Google-style docstring (see the module docstring)."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise DocstringParsingException(f"tool function {name} has no docstring; add one with a description and an "
                                        "Args: section describing each argument")
    description, arguments, returns_text = parse_docstring(doc.strip())
    parameters, returns = _parameters(func, name)
    for arg, schema in parameters["properties"].items():
        if arg not in arguments:
            raise DocstringParsingException(f"tool function {name}: the docstring's Args: section does not describe "
                                            f"argument '{arg}'; add a line `{arg}: what it is`")
        text = arguments[arg]
        choices = _CHOICES.search(text)
        if choices:
            try:
                values = json.loads(choices.group(1))
            except json.JSONDecodeError:
                raise DocstringParsingException(f"tool function {name}, argument '{arg}': (choices: ...) must hold a "
                                                f"JSON list, got {choices.group(1)!r}") from None
            schema["enum"] = [v.strip() if isinstance(v, str) else v for v in values]
            text = text[:choices.start()].strip()
        schema["description"] = text
    function = {"name": name, "description": description, "parameters": parameters}
    if returns is not None:
        if returns_text is not None:
            returns["description"] = returns_text
        function["return"] = returns
    return {"type": "function", "function": function}
