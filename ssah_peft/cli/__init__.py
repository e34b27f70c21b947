"""The ``ssah-peft`` command line: argument parsing only; the work is done by the library.

Every command is added by a ``register_<command>(subparsers)`` function listed in :data:`COMMANDS`; it creates its
subparser and sets ``handler`` (``args -> exit status``) as a default. Another module adds a command by writing
such a function and listing it here. The commands (one module each):

* ``score`` (:mod:`.score`): score a model on safety and utility data and write a unit map;
* ``units show|compare|migrate|merge-scores`` (:mod:`.units`): inspect unit maps, merge partial score files;
* ``eval`` (:mod:`.evaluate`): safety and utility of a chat model, optionally with an adapter;
* ``probe``, ``ablate``, ``scan``, ``report`` (:mod:`.analysis`): the analyses and their report;
* ``finetune`` (:mod:`.finetune`): fine-tune a chat model on the user's data, keeping its refusals;
* ``export`` (:mod:`.export`): write an adapter as a LoRA adapter or a merged checkpoint, for serving;
* ``demo`` (:mod:`.demo`): the whole experiment.

What the commands share: user errors (:mod:`.errors`), output and input paths (:mod:`.paths`), reading input files
(:mod:`.inputs`), option types and help (:mod:`.options`), the model-loading options (:mod:`.model_options`) and
the classification options (:mod:`.classification`). Every command checks its options, inputs and outputs before
loading a model, and :func:`main` reports a user error as ``ssah-peft: error: ...`` without a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, Optional

from .analysis import register_ablate, register_probe, register_report, register_scan
from .demo import register_demo
from .errors import run_command
from .evaluate import register_eval
from .export import register_export
from .finetune import register_finetune
from .inputs import read_pairs
from .options import HelpFormatter
from .score import register_score
from .units import register_units

__all__ = ["COMMANDS", "build_parser", "main", "read_pairs"]

Registrar = Callable[[Any], None]

#: The functions that add the commands, in help order.
COMMANDS: list[Registrar] = [
    register_score,
    register_units,
    register_eval,
    register_probe,
    register_ablate,
    register_scan,
    register_report,
    register_finetune,
    register_export,
    register_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssah-peft", description="Safety-aware sparse fine-tuning tools", formatter_class=HelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ssah-peft`` with ``argv`` (default: the process arguments); returns the exit status.

    A user error (a bad option, path or input file) exits, as argparse does, with ``ssah-peft: error: ...`` on
    stderr and status 2 (options, paths) or 1 (file contents); see :mod:`ssah_peft.cli.errors`.
    """
    parser = build_parser()
    return run_command(parser, parser.parse_args(argv))
