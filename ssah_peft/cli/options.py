"""The pieces every command's options are made of: the help formatter, the option types and ``--overwrite``.

The option types report a bad value through argparse, which names the option and exits with status 2 before the
command runs. Every command uses :class:`HelpFormatter`, so that each option's help states its default (a test
checks all of them). The option sets that several commands share have modules of their own:
:mod:`.model_options` (which model to load, and how) and :mod:`.classification` (how scores become a unit map).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Optional


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
