"""``ssah-peft finetune``: fine-tune a chat model on your own data while keeping its refusals.

Argument parsing and the command's checks only; the job is :mod:`ssah_peft.finetuning`. Every problem with the
options, the data, the run folder, the model or the unit map is reported before anything is written
(``ssah-peft: error: ...``): the library's validation (:meth:`~ssah_peft.finetuning.FinetuneJob.prepare`) runs
first and creates nothing.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from ..models import EMBEDDED_MODELS
from .errors import CLIError, describe_error
from .model_options import add_model_arguments, chat_template, check_model_source, device_map
from .options import add_command, add_progress_argument, positive_int
from .paths import check_safetensors_input

DESCRIPTION = """Fine-tune a chat model on your data without losing its refusals.

protect (default) trains a rank-r update of every projection with the safety units held at zero update (by
default the SCU and all CU: the only setting that kept refusals through the demo's attacks); select trains only the
given units (RU: the paper's redundant budget); lora is the plain baseline with the same settings. Without
--unit-map the model is scored first (built-in safety calibration, a sample of --data as utility calibration).
OUT gets adapter/, unitmap.safetensors, checkpoints/ (for --resume), report.md, report.json and loss_curve.png."""


def register(subparsers: Any) -> None:
    """Add the ``finetune`` subcommand; it sets ``handler`` (args -> exit status)."""
    from ..finetuning import DEFAULT_LEARNING_RATES, MODES, FinetuneOptions

    d = FinetuneOptions  # the library's defaults, shown in the help
    parser = add_command(
        subparsers, "finetune", "fine-tune a chat model on your data, keeping its refusals", DESCRIPTION
    )
    add_model_arguments(parser, required=True, chat_template=True)
    parser.add_argument(
        "--data",
        required=True,
        metavar="TRAIN",
        help="training data: .jsonl/.csv/.parquet with prompt/response columns or chat "
        "'messages' records, or a hub data set id with --split",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="run folder (new or empty, or a run to --resume)"
    )
    parser.add_argument("--mode", choices=MODES, default=d.mode, help="what trains (see above)")
    parser.add_argument(
        "--unit-map", metavar="MAP", help="unit map of this model (ssah-peft score) (default: score the model now)"
    )
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
    parser.add_argument("--safety-data", help="safety calibration pairs (default: built-in safety_calibration)")
    parser.add_argument("--utility-data", help="utility calibration pairs (default: a sample of --data)")
    parser.add_argument(
        "--calibration-samples", type=positive_int, default=d.calibration_samples, help="pairs scored per set"
    )
    parser.add_argument("--prompt-column", default=d.prompt_column, help="column of the user turn")
    parser.add_argument("--response-column", default=d.response_column, help="column of the answer")
    parser.add_argument("--split", help="split of a hub data set given as --data (default: none)")
    parser.add_argument(
        "--eval-data", metavar="EVAL", help="records for perplexity (default: a held-out tenth of --data)"
    )
    parser.add_argument(
        "--safety-eval-data", help="harmful prompts (a 'prompt' column) for the ASR (default: built-in held-out set)"
    )
    parser.add_argument(
        "--eval-limit", type=positive_int, help="prompts per evaluation set, spread over categories (default: all)"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=d.max_new_tokens, help="tokens generated per eval prompt"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=positive_int, help="optimizer steps (default: --epochs)")
    length.add_argument("--epochs", type=_positive_float, default=d.epochs, help="passes over the data")
    rates = ", ".join(f"{lr:g} for {mode}" for mode, lr in DEFAULT_LEARNING_RATES.items())
    parser.add_argument("--learning-rate", type=_positive_float, help=f"constant learning rate (default: {rates})")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="examples per device and step")
    parser.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="gradient accumulation steps")
    parser.add_argument("--max-length", type=positive_int, default=d.max_length, help="tokens per example")
    parser.add_argument("--rank", type=positive_int, default=d.rank, help="rank of protect and lora (alpha = 2·rank)")
    parser.add_argument("--save-steps", type=positive_int, default=d.save_steps, help="checkpoint every N steps")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--seed", type=int, default=d.seed, help="adapter init and data order")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_progress_argument(parser)
    parser.set_defaults(handler=partial(run_finetune_command, parser=parser))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


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
    from ..finetuning import FinetuneJob, FinetuneOptions

    if args.protect is not None and args.mode != "protect":
        raise CLIError(f"--protect is for --mode protect (got --mode {args.mode}); select mode takes --units")
    if args.units is not None and args.mode != "select":
        raise CLIError(f"--units is for --mode select (got --mode {args.mode}); protect mode takes --protect")
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    if args.unit_map is not None:
        check_safetensors_input(args.unit_map, "--unit-map")
    template, _ = chat_template(args)
    types = args.protect if args.protect is not None else args.units
    with _input_errors():
        options = FinetuneOptions(
            model=args.model,
            data=args.data,
            out=args.out,
            mode=args.mode,
            unit_map=args.unit_map,
            unit_types=None if types is None else tuple(t for t in types.split(",") if t.strip()),
            safety_data=args.safety_data,
            utility_data=args.utility_data,
            calibration_samples=args.calibration_samples,
            prompt_column=args.prompt_column,
            response_column=args.response_column,
            split=args.split,
            eval_data=args.eval_data,
            safety_eval_data=args.safety_eval_data,
            eval_limit=args.eval_limit,
            evaluate=not args.no_eval,
            max_new_tokens=args.max_new_tokens,
            max_steps=args.max_steps,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_length=args.max_length,
            rank=args.rank,
            save_steps=args.save_steps,
            dtype=args.dtype,
            device_map=device_map(args),
            load_in_4bit=args.load_in_4bit,
            gradient_checkpointing=args.gradient_checkpointing,
            chat_template=template,
            seed=args.seed,
            resume=args.resume,
            show_progress=not args.no_progress,
            command=command_line(args, parser),
        )
        job = FinetuneJob.prepare(options)
    result = job.run()
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
