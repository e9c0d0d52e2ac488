"""HfArgumentParser builds the reference's argparse actions (its tests compare them field by field), with
make_choice_type_function for mixed-type choices, string_to_bool, `<script>.args` files and TrainingArguments'
_VALID_DICT_FIELDS."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import field
from enum import Enum
from typing import Literal

import pytest

from loom.training import HfArgumentParser, TrainingArguments
from loom.training.argparser import make_choice_type_function, string_to_bool


class Color(Enum):
    red = "red"
    answer = 42


@dataclasses.dataclass
class Example:
    name: str
    count: int = 3
    ratio: float | None = field(default=None, metadata={"help": "a ratio", "aliases": ["-r"]})
    flag: bool = False
    on: bool = True
    maybe: bool | None = None
    color: Color = Color.red
    mode: Literal["a", "b", 7] = "a"
    tags: list[str] = field(default_factory=lambda: ["x"])
    ids: list[int] = field(default_factory=list)


def _actions(parser) -> list[dict]:
    out = []
    for action in parser._actions:
        found = {k: v for k, v in vars(action).items() if k != "container"}
        if found.get("choices"):  # a choice's type is a function: compare what it makes of each choice
            found["type"] = [found["type"](str(c)) for c in found["choices"]]
        elif found.get("type") is not None:
            found["type"] = found["type"].__name__
        out.append(found)
    return out


def test_actions_equal_the_references():
    import transformers

    assert _actions(HfArgumentParser(Example)) == _actions(transformers.HfArgumentParser(Example))


def test_parsing_mixed_choices_booleans_and_lists():
    parser = HfArgumentParser(Example)
    (args,) = parser.parse_args_into_dataclasses(["--name", "n", "--mode", "7", "--flag", "--no_on", "--maybe", "no",
                                                  "--ids", "1", "2", "-r", "0.5"], look_for_args_file=False)
    assert (args.mode, args.flag, args.on, args.maybe, args.ids, args.ratio) == (7, True, False, False, [1, 2], 0.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "n", "--mode", "c"])  # not among the choices


def test_choice_type_and_string_to_bool():
    to_choice = make_choice_type_function(["a", 7, 1.5])
    assert (to_choice("7"), to_choice("1.5"), to_choice("a"), to_choice("zz")) == (7, 1.5, "a", "zz")
    assert string_to_bool("YES") is True and string_to_bool("f") is False and string_to_bool(True) is True
    with pytest.raises(Exception, match="expected a boolean"):
        string_to_bool("maybe")


def test_args_file_beside_the_script(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    (tmp_path / "train.args").write_text("--name from_file --count 9\n")
    monkeypatch.setattr(sys, "argv", [str(script), "--count", "4"])
    (args,) = HfArgumentParser(Example).parse_args_into_dataclasses()
    assert (args.name, args.count) == ("from_file", 4)  # the command line wins
    with pytest.raises(SystemExit):  # without the file, --name is missing
        HfArgumentParser(Example).parse_args_into_dataclasses(look_for_args_file=False)


def test_valid_dict_fields_are_the_references_and_not_fields():
    import transformers

    assert TrainingArguments._VALID_DICT_FIELDS == transformers.TrainingArguments._VALID_DICT_FIELDS
    assert "_VALID_DICT_FIELDS" not in {f.name for f in dataclasses.fields(TrainingArguments)}
