"""Python functions as chat-template tools: schemas and rendered prompts equal to the reference's."""
from __future__ import annotations

import json
from enum import Enum
from typing import Any, Literal, Optional, Union

import pytest
import torch

from loom.tokenization import DocstringParsingException, TypeHintParsingException, get_json_schema


class Unit(Enum):
    CELSIUS = "celsius"
    KELVIN = 0


class Calculator:
    def add(self, x: float, y: float = 0.0) -> float:
        """Add two numbers.

        Args:
            x: The first number
            y: The second number
        Returns:
            The sum
        """
        return x + y


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int | None = None) -> dict:
    """
    Get the weather forecast for a city.
    Uses a made-up service.

    Args:
        city: The city to look up, e.g.
            "Paris" or "Tokyo".
        unit (str): The temperature unit
        days: How many days ahead

    Returns:
        The forecast, keyed by day.
    """


def search(query: str, tags: list[str], limits: tuple[int, float], scores: dict[str, float], mode: str,
           extra: Any = None, either: Union[int, str] = 1, maybe: Optional[list[int]] = None,
           mixed: Union[list[int], str, None] = None, unit: Unit = Unit.CELSIUS, flag: bool = False,
           plain_list: list = (), clip: torch.Tensor = None) -> Calculator:
    """Search documents.

    Args:
        query: What to search for
        tags: Tags to filter on
        limits: A (count, threshold) pair
        scores: Score per field
        mode: The search mode (choices: ["fast", " exact", 3])
        extra: Anything else
        either: An int or a str
        maybe: Optional ids
        mixed: Ids, a name, or nothing
        unit: The unit
        flag: A switch
        plain_list: Untyped items
        clip: An audio clip
    Raises:
        ValueError: never
    """


TOOLS = [get_weather, search, Calculator().add]


@pytest.mark.parametrize("func", TOOLS)
def test_schema_equals_reference(func):
    from transformers.utils import get_json_schema as reference_schema

    # compared as JSON text: templates render with tojson, so key order matters as much as content
    assert json.dumps(get_json_schema(func)) == json.dumps(reference_schema(func))


def test_rendered_prompt_with_function_tools_equals_reference(loom_tok, reference):
    tok, ref = loom_tok("llama3_chat"), reference("llama3_chat")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    mixed = [TOOLS[0], {"type": "function", "function": {"name": "noop", "parameters": {}}}, TOOLS[2]]
    for tools in (TOOLS, mixed):
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert '"name": "get_weather"' in text and '"nullable": true' in text
        assert tok.apply_chat_template(messages, tools=tools)["input_ids"] == \
               ref.apply_chat_template(messages, tools=tools)["input_ids"]


def no_doc(x: int):
    return x


def no_hint(x, y: int):
    """Add.

    Args:
        x: a number
        y: another
    """


def undocumented_arg(city: str, days: int):
    """Weather.

    Args:
        city: The city
    """


def custom_class(where: Calculator):
    """Custom.

    Args:
        where: a calculator
    """


def one_tuple(pair: tuple[int]):
    """One.

    Args:
        pair: a one-tuple
    """


def unresolved_hint(x: "NoSuchType"):  # noqa: F821
    """Unresolved.

    Args:
        x: a thing
    """


def bad_choices(mode: str):
    """Bad.

    Args:
        mode: The mode (choices: [fast, slow])
    """


@pytest.mark.parametrize("func, error, message", [
    (no_doc, DocstringParsingException, "tool function no_doc has no docstring"),
    (no_hint, TypeHintParsingException, "tool function no_hint: argument 'x' has no type hint"),
    (undocumented_arg, DocstringParsingException, "tool function undocumented_arg: .* argument 'days'"),
    (custom_class, TypeHintParsingException, "tool function custom_class, argument 'where': the type hint"),
    (one_tuple, TypeHintParsingException, "argument 'pair': a one-element tuple"),
    (unresolved_hint, TypeHintParsingException, "tool function unresolved_hint: its type hints cannot be"),
    (bad_choices, DocstringParsingException, r"argument 'mode': \(choices: ...\) must hold a JSON list"),
])
def test_unconvertible_functions_name_function_and_argument(func, error, message):
    with pytest.raises(error, match=message):
        get_json_schema(func)


def test_bad_tool_in_a_chat_is_refused(loom_tok):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match=r"tools\[1\] must be a JSON schema \(a dict\) or a Python function"):
        loom_tok("llama3_chat").apply_chat_template(messages, tools=[get_weather, "get_weather"], tokenize=False)
    with pytest.raises(DocstringParsingException, match="undocumented_arg"):
        loom_tok("llama3_chat").apply_chat_template(messages, tools=[undocumented_arg], tokenize=False)


def test_utils_reexports_like_transformers_utils():
    """`from transformers.utils import get_json_schema` ports by changing only the package name."""
    import loom.tokenization
    from loom.utils import DocstringParsingException, TypeHintParsingException, get_json_schema

    assert get_json_schema is loom.tokenization.get_json_schema
    assert issubclass(DocstringParsingException, ValueError) and issubclass(TypeHintParsingException, TypeError)
