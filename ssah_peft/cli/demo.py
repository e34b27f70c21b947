"""``ssah-peft demo`` (and ``python -m ssah_peft demo``): the whole SSAH experiment, resumable."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..experiments import ATTACK_SETS, DemoConfig, check_run_dir, run_demo
from ..models import DEFAULT_MODEL
from .errors import user_errors
from .model_options import check_model_source
from .options import add_command, positive_int
from .paths import check_output_dir

# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (about 3 minutes on 2 CPU cores)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="where stages cache their results (default: runs/demo, or runs/demo-quick with --quick)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model to align and attack (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACK_SETS,
        help="benign fine-tuning attacks of stage 4 (default: task; identity_shift adds about 7 minutes)",
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def register_demo(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to an ``argparse`` subparsers object; it sets ``handler``."""
    parser = add_command(
        subparsers,
        "demo",
        "run the whole SSAH experiment end to end (resumable)",
        "Run the whole SSAH experiment on one chat model, end to end; stages resume from --run-dir.",
    )
    add_demo_arguments(parser)
    parser.set_defaults(handler=run_demo_command, program="ssah-peft demo")


def run_demo_command(args: argparse.Namespace) -> int:
    """Handler of ``ssah-peft demo``; the run directory and the model are checked before anything runs."""
    from ..models import EMBEDDED_MODELS

    preset = DemoConfig.quick if args.quick else DemoConfig.full
    config = preset(**({"run_dir": args.run_dir} if args.run_dir else {}))
    if args.attacks:
        config = config.with_attacks(args.attacks)
    check_output_dir(config.run_dir, "--run-dir")
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = replace(config, model=args.model, show_progress=not args.no_progress)
    with user_errors(config.run_dir):
        check_run_dir(config)  # results of other settings (run_demo checks again, finding them equal)
    options = [
        *(["--quick"] if args.quick else []),
        "--run-dir",
        str(config.run_dir),
        "--model",
        config.model,
        *(["--attacks", *config.attacks] if args.attacks else []),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    command = f"{args.program} {shlex.join(options)}"
    print(run_demo(config, command=command).read_text(encoding="utf-8"))
    return 0
