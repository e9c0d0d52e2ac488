"""HfArgumentParser: fill dataclasses from command-line flags, a JSON or YAML file, or a dict."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Literal


def string_to_bool(text) -> bool:
    """A command-line boolean: yes/no, true/false, t/f, y/n, 1/0 in any case (a bool passes through)."""
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {text!r}")


def make_choice_type_function(choices: list) -> Callable[[str], Any]:
    """The `type` of a flag whose choices mix types (Literal["a", 42]): the text of a choice maps back to that choice,
    anything else stays text (and argparse then names it as not among the choices)."""
    by_text = {str(choice): choice for choice in choices}
    return lambda text: by_text.get(text, text)


def _unwrap_optional(tp):
    """`X | None` -> X; other unions are kept (the first non-None member is used for parsing)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return members[0] if members else str
    return tp


class HfArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose arguments are the fields of one or more dataclasses.

    Booleans accept `--flag`, `--flag true|false`, and `--no_flag` when they default to True; list fields take
    several values; Literal and Enum fields become choices. A single `.json`/`.yaml` argument is read as a file.
    """

    def __init__(self, dataclass_types, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)
        self.dataclass_types = list(dataclass_types) if isinstance(dataclass_types, (list, tuple)) else \
            [dataclass_types]
        for dtype in self.dataclass_types:
            if not dataclasses.is_dataclass(dtype):
                raise TypeError(f"HfArgumentParser takes dataclass types, got {dtype!r}")
            hints = typing.get_type_hints(dtype)
            for f in dataclasses.fields(dtype):
                if f.init:
                    self._add_field(f, hints[f.name])

    def _add_field(self, f: dataclasses.Field, tp) -> None:
        """One flag per field, built as the reference builds it (its tests compare the argparse actions): the field's
        metadata are add_argument's keywords (`aliases` adds option strings), `X | None` parses as X."""
        kwargs = dict(f.metadata)
        aliases = kwargs.pop("aliases", [])
        names = [f"--{f.name}", *([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []),
                 *([aliases] if isinstance(aliases, str) else aliases)]
        members = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else set()
        optional_bool = members == {bool, type(None)}
        base = bool if optional_bool else _unwrap_optional(tp)
        origin = typing.get_origin(base)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        off_switch = dict(kwargs)
        if origin is Literal or (isinstance(base, type) and issubclass(base, Enum)):
            choices = typing.get_args(base) if origin is Literal else [e.value for e in base]
            kwargs.update(choices=choices, type=make_choice_type_function(choices))
        elif base is bool:
            kwargs["type"] = string_to_bool
            if not optional_bool or f.default not in (None, dataclasses.MISSING):
                # `--flag` alone means true; no flag means the default (false when there is none)
                default = False if f.default is dataclasses.MISSING else f.default
                kwargs.update(nargs="?", const=True)
        elif origin in (list, typing.List) or base is list:  # noqa: UP006
            args = typing.get_args(base)
            kwargs.update(type=args[0] if args else str, nargs="+")
        elif origin is dict or base is dict or dict in members:
            kwargs["type"] = json.loads  # a JSON object on the command line
        else:
            kwargs["type"] = base if isinstance(base, type) else str
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        self.add_argument(*names, **kwargs)
        if f.default is True and base is bool:  # after the flag itself, whose default then wins
            self.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                              dest=f.name, **{**off_switch, "default": False})

    def parse_args_into_dataclasses(self, args: Iterable[str] | None = None, return_remaining_strings: bool = False,
                                    look_for_args_file: bool = True, args_filename: str | None = None) -> tuple:
        """Parse flags (default sys.argv[1:]) into one instance per dataclass; optionally the unparsed rest. Flags
        in `args_filename`, else (look_for_args_file) in a `<script>.args` file beside the running script, come
        first, so the command line overrides them."""
        args = list(sys.argv[1:] if args is None else args)
        if args_filename is None and len(args) == 1 and Path(args[0]).suffix in (".json", ".yaml", ".yml"):
            return self._parse_file(args[0])
        beside_script = Path(sys.argv[0]).with_suffix(".args") if sys.argv and sys.argv[0] else None
        if args_filename is None and look_for_args_file and beside_script is not None and beside_script.is_file():
            args_filename = beside_script
        if args_filename is not None:
            args = _file_as_flags(args_filename) + args
        namespace, remaining = self.parse_known_args(args=args)
        outputs = self._split(vars(namespace))
        if remaining and not return_remaining_strings:
            raise ValueError(f"unknown command-line arguments {remaining}; run with --help to see the known ones")
        return (*outputs, remaining) if return_remaining_strings else tuple(outputs)

    def parse_dict(self, args: dict[str, Any], allow_extra_keys: bool = False) -> tuple:
        """Build the dataclasses from a dict of field values (unknown keys are an error unless allowed)."""
        known = set()
        outputs = []
        for dtype in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init}
            known |= names
            outputs.append(dtype(**{k: v for k, v in args.items() if k in names}))
        extra = sorted(set(args) - known)
        if extra and not allow_extra_keys:
            raise ValueError(f"keys {extra} are not fields of {[d.__name__ for d in self.dataclass_types]}; remove "
                             "them or pass allow_extra_keys=True")
        return tuple(outputs)

    def parse_json_file(self, json_file: str | Path, allow_extra_keys: bool = False) -> tuple:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
        return self.parse_dict(_as_mapping(data, json_file), allow_extra_keys=allow_extra_keys)

    def parse_yaml_file(self, yaml_file: str | Path, allow_extra_keys: bool = False) -> tuple:
        from loom.utils import require

        yaml = require("yaml", "HfArgumentParser.parse_yaml_file", "pyyaml")
        data = yaml.safe_load(Path(yaml_file).read_text(encoding="utf-8"))
        return self.parse_dict(_as_mapping(data, yaml_file), allow_extra_keys=allow_extra_keys)

    def _parse_file(self, path: str) -> tuple:
        if path.endswith(".json"):
            return self.parse_json_file(path)
        return self.parse_yaml_file(path)

    def _split(self, values: dict[str, Any]) -> list:
        outputs = []
        for dtype in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init}
            outputs.append(dtype(**{k: values.pop(k) for k in list(values) if k in names}))
        return outputs


def _as_mapping(data, path) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values, got {type(data).__name__}")
    return data


def _file_as_flags(path: str) -> list[str]:
    """An args file holds flags separated by whitespace, as the reference's `.args` files do."""
    return Path(path).read_text(encoding="utf-8").split()
