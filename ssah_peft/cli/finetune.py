"""``ssah-peft finetune``: fine-tune a chat model on your own data while keeping its refusals.

Argument parsing and the command's checks only; the job is :mod:`ssah_peft.finetuning`. The options are generated
from :class:`~ssah_peft.finetuning.FinetuneOptions`'s fields (:func:`~.options.add_dataclass_arguments`), where they
are declared once with their help, defaults and checks. Every problem with the options, the data, the run folder,
the model or the unit map is reported before anything is written (``ssah-peft: error: ...``): the library's
validation (:meth:`~ssah_peft.finetuning.FinetuneJob.prepare`) runs first and creates nothing, and what
:meth:`~ssah_peft.finetuning.FinetuneJob.run` refuses before writing (:class:`~ssah_peft.finetuning.RunRefused`)
is reported the same way.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from ..models import EMBEDDED_MODELS
from .errors import CLIError, describe_error, user_errors
from .model_options import add_model_arguments, chat_template, check_model_source, device_map
from .options import Declared, add_command, add_dataclass_arguments, dataclass_values
from .paths import check_safetensors_input

DESCRIPTION = """Fine-tune a chat model on your data without losing its refusals.

protect (default) trains a rank-r update of every projection with the safety units held at zero update (by
default the SCU and all CU: the only setting that kept refusals through the demo's attacks); select trains only the
given units (RU: the paper's redundant budget); lora is the plain baseline with the same settings. Without
--unit-map the model is scored first (built-in safety calibration, a sample of --data as utility calibration).
OUT gets adapter/, unitmap.safetensors, checkpoints/ (for --resume), report.md, report.json and loss_curve.png."""


def register_finetune(subparsers: Any) -> None:
    """Add the ``finetune`` subcommand, its options generated from :class:`~ssah_peft.finetuning.FinetuneOptions`'s
    fields; it sets ``handler`` (args -> exit status)."""
    from ..finetuning import FinetuneOptions

    parser = add_command(
        subparsers, "finetune", "fine-tune a chat model on your data, keeping its refusals", DESCRIPTION
    )
    add_dataclass_arguments(parser, FinetuneOptions, _declared())
    parser.set_defaults(handler=partial(run_finetune_command, parser=parser))


def _declared() -> Declared:
    """The fields whose options the command declares itself: the model-loading option set shared by every command
    (``--chat-template`` is a file, ``--device-map`` has launcher-aware defaults), the unit types (``--protect``
    or ``--units``, by mode) and the command line the report quotes."""
    return {
        "model": partial(add_model_arguments, required=True, chat_template=True),  # --model and the next four
        **dict.fromkeys(("dtype", "device_map", "load_in_4bit", "chat_template"), None),
        "unit_types": _add_unit_type_arguments,
        "command": None,
    }


def _add_unit_type_arguments(parser: argparse.ArgumentParser) -> None:
    units = parser.add_mutually_exclusive_group()
    units.add_argument(
        "--protect",
        metavar="TYPES",
        help="protect mode: unit types to freeze, comma-separated; CU:F = the most safety-leaning CU making up a "
        "fraction F of all units, e.g. SCU,CU:0.06 (the paper's) (default: SCU,CU)",
    )
    units.add_argument(
        "--units", metavar="TYPES", help="select mode: unit types to train, comma-separated (default: RU)"
    )


@contextmanager
def _input_errors() -> Iterator[None]:
    """Errors of the job's validation: the user's data, folder, model or unit map; one line each."""
    from safetensors import SafetensorError

    try:
        yield
    except (ValueError, TypeError, KeyError, OSError, SafetensorError) as error:
        raise CLIError(describe_error(error), 2 if isinstance(error, FileNotFoundError) else 1) from error


def run_finetune_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Handler of ``ssah-peft finetune``: check, validate (nothing written), run, print the report."""
    from ..finetuning import FinetuneJob, FinetuneOptions, RunRefused
    from ..finetuning.report import data_facts, data_lines

    if args.protect is not None and args.mode != "protect":
        raise CLIError(f"--protect is for --mode protect (got --mode {args.mode}); select mode takes --units")
    if args.units is not None and args.mode != "select":
        raise CLIError(f"--units is for --mode select (got --mode {args.mode}); protect mode takes --protect")
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    if args.unit_map is not None:
        check_safetensors_input(args.unit_map, "--unit-map")
    template, _ = chat_template(args)
    if args.chat_template is not None:
        with user_errors(args.chat_template):
            FinetuneOptions.check_value("chat_template", template)
    types = args.protect if args.protect is not None else args.units
    with _input_errors():
        options = FinetuneOptions(
            **dataclass_values(args, FinetuneOptions, _declared()),
            model=args.model,
            dtype=args.dtype,
            device_map=device_map(args),
            load_in_4bit=args.load_in_4bit,
            chat_template=template,
            unit_types=types,
            command=command_line(args, parser),
        )
        job = FinetuneJob.prepare(options)
    print(
        "\n".join(data_lines(data_facts(options, job.train, job.training, job.harmful))), flush=True
    )  # before the long work
    try:
        result = job.run()
    except RunRefused as error:  # the run folder in use, or a scored map that leaves nothing to train
        raise CLIError(str(error), 1) from error
    print((result.out / "report.md").read_text(encoding="utf-8") if (result.out / "report.md").is_file() else "")
    print(f"adapter: {result.adapter}\nreport: {result.out / 'report.md'}")
    return 0


def command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The command as typed, up to option order: every option whose value is not its default."""
    words = ["ssah-peft", "finetune"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False or (value == action.default and not action.required):
            continue
        words.append(action.option_strings[0])
        if value is not True:
            words.append(str(value))
    return shlex.join(words)
