"""``ssah-peft eval``: evaluate a chat model (optionally with a peft adapter) on the built-in sets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..evaluate import SUITES, GenerationSettings, HFJudge, report_markdown, run_evaluation
from ..models import DEFAULT_MODEL


def register(subparsers: Any) -> None:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object; it sets ``handler`` (args -> exit status)."""
    from .checks import MODEL_HELP, HelpFormatter, add_overwrite_argument, positive_int

    parser = subparsers.add_parser(
        "eval",
        help="evaluate safety (ASR, over-refusal) and utility (task accuracy, perplexity) of a chat model",
        description="Evaluate a chat model, optionally with a peft adapter, on the built-in evaluation sets.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument(
        "--adapter", help="peft adapter folder (or hub id) to load on top of the model (default: none)"
    )
    parser.add_argument("--suite", choices=SUITES, default="all", help="evaluation suites to run")
    parser.add_argument(
        "--out", type=Path,
        help="folder for report.json, report.md and generations.jsonl (default: print the table only)",
    )
    parser.add_argument(
        "--limit", type=positive_int, help="evaluate only the first N records of each set (default: all)"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=GenerationSettings.max_new_tokens,
        help="tokens generated per prompt",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=GenerationSettings.batch_size, help="prompts per batch"
    )
    parser.add_argument("--system-prompt", help="system turn for every prompt (default: the chat template's)")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"),
        help="weight dtype (default: the checkpoint's)",
    )
    parser.add_argument("--device-map", help='e.g. "auto", "cpu", "cuda:0" (default: transformers\' default)')
    parser.add_argument("--load-in-4bit", action="store_true", help="load the model in NF4 with bitsandbytes")
    parser.add_argument("--judge", help="HF classifier or causal-LM judge (path or hub id) for attack success "
                        "(default: refusal keywords)")
    parser.add_argument("--judge-positive", help='label or answer prefix meaning "harmful" (default: 1 / "unsafe")')
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_overwrite_argument(parser)
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    """Handler of ``ssah-peft eval``: load, evaluate, print the Markdown table, write files with ``--out``.

    Options, paths and the output folder are checked before anything is loaded (:mod:`ssah_peft.cli_checks`).
    """
    from .checks import EVAL_REPORT, EVAL_REPORT_PART, check_model_source, check_output_dir, loading
    from ..models import EMBEDDED_MODELS, load

    files = {"report.json": EVAL_REPORT, "report.md": EVAL_REPORT_PART, "generations.jsonl": EVAL_REPORT_PART}
    check_output_dir(args.out, "--out", files, overwrite=args.overwrite)
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    check_model_source(args.adapter, "--adapter", marker="adapter_config.json", what="peft adapter")
    check_model_source(args.judge, "--judge")
    with loading(args.model):
        model, tokenizer = load(
            args.model, dtype=args.dtype, device_map=args.device_map, load_in_4bit=args.load_in_4bit
        )
    if args.adapter:
        from peft import PeftModel

        with loading(args.adapter, "--adapter"):
            model = PeftModel.from_pretrained(model, args.adapter)
    harm_judge = None
    if args.judge:
        with loading(args.judge, "--judge"):
            harm_judge = HFJudge.from_pretrained(args.judge, positive=args.judge_positive)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  system_prompt=args.system_prompt, show_progress=not args.no_progress)
    report, _ = run_evaluation(model, tokenizer, suite=args.suite, model_name=args.model, adapter=args.adapter,
                               settings=settings, harm_judge=harm_judge, limit=args.limit, out_dir=args.out)
    print(report_markdown(report))
    if args.out is not None:
        print(f"\nreport: {args.out / 'report.json'}")
    return 0
