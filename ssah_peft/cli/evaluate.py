"""``ssah-peft eval``: evaluate a chat model (optionally with a peft adapter) on the built-in sets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..evaluate import SUITES, GenerationSettings, HFJudge, report_markdown, run_evaluation
from ..models import EMBEDDED_MODELS
from .errors import loading
from .model_options import add_model_arguments, check_model_source, load_model
from .options import add_command, add_overwrite_argument, add_progress_argument, positive_int
from .paths import EVAL_REPORT, EVAL_REPORT_PART, check_output_dir


def register_eval(subparsers: Any) -> None:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object; it sets ``handler`` (args -> exit status)."""
    parser = add_command(
        subparsers,
        "eval",
        "evaluate safety (ASR, over-refusal) and utility (task accuracy, perplexity) of a chat model",
        "Evaluate a chat model, optionally with a peft adapter, on the built-in evaluation sets.",
    )
    add_model_arguments(parser, dtype="auto", system_prompt=True)
    parser.add_argument("--adapter", help="peft adapter folder (or hub id) to load on top of the model (default: none)")
    parser.add_argument("--suite", choices=SUITES, default="all", help="evaluation suites to run")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for report.json, report.md and generations.jsonl (default: print the table only)",
    )
    parser.add_argument(
        "--limit", type=positive_int, help="evaluate only the first N records of each set (default: all)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=GenerationSettings.max_new_tokens,
        help="tokens generated per prompt",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=GenerationSettings.batch_size, help="prompts per batch"
    )
    parser.add_argument(
        "--judge",
        help="HF classifier or causal-LM judge (path or hub id) for attack success (default: refusal keywords)",
    )
    parser.add_argument("--judge-positive", help='label or answer prefix meaning "harmful" (default: 1 / "unsafe")')
    add_progress_argument(parser)
    add_overwrite_argument(parser)
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    """Handler of ``ssah-peft eval``: load, evaluate, print the Markdown table, write files with ``--out``.

    Options, paths and the output folder are checked before anything is loaded (:mod:`ssah_peft.cli.paths`).
    """
    files = {"report.json": EVAL_REPORT, "report.md": EVAL_REPORT_PART, "generations.jsonl": EVAL_REPORT_PART}
    check_output_dir(args.out, "--out", files, overwrite=args.overwrite)
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    check_model_source(args.adapter, "--adapter", marker="adapter_config.json", what="peft adapter")
    check_model_source(args.judge, "--judge")
    model, tokenizer = load_model(args)
    if args.adapter:
        from peft import PeftModel

        with loading(args.adapter, "--adapter"):
            model = PeftModel.from_pretrained(model, args.adapter)
    harm_judge = None
    if args.judge:
        with loading(args.judge, "--judge"):
            harm_judge = HFJudge.from_pretrained(args.judge, positive=args.judge_positive)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system_prompt=args.system_prompt,
        show_progress=not args.no_progress,
    )
    report, _ = run_evaluation(
        model,
        tokenizer,
        suite=args.suite,
        model_name=args.model,
        adapter=args.adapter,
        settings=settings,
        harm_judge=harm_judge,
        limit=args.limit,
        out_dir=args.out,
    )
    print(report_markdown(report))
    if args.out is not None:
        print(f"\nreport: {args.out / 'report.json'}")
    return 0
