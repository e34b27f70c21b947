"""The pieces every command's options are made of: the help formatter, the option types, ``--overwrite``,
and the options generated from a library's options dataclass (:func:`add_dataclass_arguments`, used by ``finetune``).

The option types report a bad value through argparse, which names the option and exits with status 2 before the
command runs. Every command uses :class:`HelpFormatter`, so that each option's help states its default (a test
checks all of them). The option sets that several commands share have modules of their own:
:mod:`.model_options` (which model to load, and how) and :mod:`.classification` (how scores become a unit map).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to every option's help that does not state its default itself, or ``(required)``
    to a required option's."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return text if "required" in text else f"{text} (required)"
        if "default" in text.lower() or "required" in text:
            return text
        default = action.default
        if default is None:
            shown = "none"
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default))
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks."""


def add_command(
    subparsers: Any,
    name: str,
    summary: str,
    description: Optional[str] = None,
    formatter_class: type[argparse.HelpFormatter] = HelpFormatter,
) -> argparse.ArgumentParser:
    """A (sub)command's parser: ``summary`` in the list of commands, ``description`` (default: the summary) on
    its own help page, and a formatter that shows every option's default."""
    return subparsers.add_parser(
        name, help=summary, description=description or summary, formatter_class=formatter_class
    )


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``, for every command that writes files (:mod:`.paths`)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files even if ssah-peft did not write them (without it, only files of the "
        "kind being written are replaced)",
    )


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``, for every command that shows progress bars."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ----------------------------------------------------------------------------------------------------
# Option types (argparse reports their errors with the option's name, exit status 2)
# ----------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """``type=`` for counts and sizes: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}")
    return value


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """``type=`` for a comma-separated list, each non-empty item converted by ``kind`` (``comma_list(int)``:
    "0,1,2"); the benchmarks' list options."""

    def parse(text: str) -> list[Any]:
        return [kind(item) for item in text.split(",") if item]

    return parse


def fraction(text: str) -> float:
    """``type=`` for fractions of all units: a number in [0, 1]."""
    return _fraction(text, zero=True)


def positive_fraction(text: str) -> float:
    """``type=`` for fractions to prune or scan: a number in (0, 1]."""
    return _fraction(text, zero=False)


def _fraction(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if not (0.0 <= value if zero else 0.0 < value) or value > 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in {'[' if zero else '('}0, 1], got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Options generated from a dataclass (as transformers' HfArgumentParser and trl's TrlParser do)
# ----------------------------------------------------------------------------------------------------

#: How a command declares fields itself: a function that adds their options at the field's place in the help, or
#: None for a field that has no option of its own (set from other options by the command).
Declared = Mapping[str, Optional[Callable[[argparse.ArgumentParser], None]]]


def add_dataclass_arguments(parser: argparse.ArgumentParser, options: type, declared: Declared) -> None:
    """One option per field of the dataclass ``options``, in field order, so that a library's options are declared
    once (as fields with help and defaults) and the command line cannot drift from them.

    A field ``name`` becomes ``--name`` (dashes for underscores) with the field's ``help``, default (a field without
    one is required) and, from its metadata, ``metavar`` and ``choices``; fields with the same ``exclusive`` name
    form a mutually exclusive group. A bool field is a flag: ``--name`` turns on a field that is off by default, and
    the metadata's ``negation = (flag, help)`` turns off one that is on. Any other option parses its text as the
    field's type and checks it with ``options.check_value(name, value)``, so a bad value is refused by argparse,
    naming the option, with the library's own message. Fields in ``declared`` are left to the command.
    """
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(options):
        if field.name in declared:
            add = declared[field.name]
            if add is not None:
                add(parser)
            continue
        metadata = field.metadata
        target = parser
        if "exclusive" in metadata:
            if metadata["exclusive"] not in groups:
                groups[metadata["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[metadata["exclusive"]]
        flag, dest, negated = _option_of(field)
        kind = _base_type(options, field.name)
        if kind is bool:
            if field.default is True and not negated:
                raise TypeError(f"{field.name}: a flag on by default needs a 'negation' (its --no-... flag and help)")
            target.add_argument(
                flag, dest=dest, action="store_true", help=metadata["negation"][1] if negated else metadata["help"]
            )
            continue
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        arguments: dict[str, Any] = {"dest": dest, "help": metadata["help"], "required": required}
        if not required:
            arguments["default"] = field.default
        if "metavar" in metadata:
            arguments["metavar"] = metadata["metavar"]
        if "choices" in metadata:
            arguments["choices"] = metadata["choices"]
        else:
            arguments["type"] = _checked_type(options, field.name, kind)
        target.add_argument(flag, **arguments)


def dataclass_values(args: argparse.Namespace, options: type, declared: Declared) -> dict[str, Any]:
    """The values of the fields of ``options`` that :func:`add_dataclass_arguments` put into ``args`` (a negation
    flag given is the field off); fields in ``declared`` are left out, for the command to set."""
    values = {}
    for field in dataclasses.fields(options):
        if field.name not in declared:
            _, dest, negated = _option_of(field)
            value = getattr(args, dest)
            values[field.name] = (not value) if negated else value
    return values


def _option_of(field: dataclasses.Field) -> tuple[str, str, bool]:
    """``(flag, dest, negated)`` of a field's option: ``--name``, or its ``negation`` flag."""
    if "negation" in field.metadata:
        flag = field.metadata["negation"][0]
        return flag, flag.lstrip("-").replace("-", "_"), True
    return f"--{field.name.replace('_', '-')}", field.name, False


def _base_type(options: type, name: str) -> Any:
    """The type of field ``name`` without ``Optional``: what its option's text is parsed as."""
    hint = typing.get_type_hints(options)[name]
    members = [m for m in typing.get_args(hint) if m is not type(None)] if typing.get_origin(hint) is Union else [hint]
    return members[0]


def _checked_type(options: type, name: str, kind: type) -> Callable[[str], Any]:
    """``type=`` of field ``name``: its text parsed as ``kind`` (the field's type), then checked by
    ``options.check_value``."""
    expected = {int: "an integer", float: "a number"}

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected.get(kind, kind.__name__)}, got {text!r}") from None
        try:
            return options.check_value(name, value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = kind.__name__
    return parse
