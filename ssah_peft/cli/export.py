"""``ssah-peft export``: write an SSAH adapter as a peft LoRA adapter or a merged checkpoint, for serving.

Everything that can be checked without the model is checked first: the output folder, the adapter's config (an
SSAH adapter), and whether the format can hold it (for a local adapter folder, the LoRA ranks it needs, read from
its weights file's header). Then the base model (``--model``, default: the base model the adapter records) and the
adapter are loaded and written by :func:`ssah_peft.export.export_adapter`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftModel

from ..export import (
    DEFAULT_MAX_RANK,
    EXPORT_FORMATS,
    ExportOptions,
    export_adapter,
    output_folder_problem,
    stored_slice_counts,
)
from ..models import EMBEDDED_MODELS
from ..tuner import SSAHConfig
from .errors import CLIError, loading, user_errors
from .model_options import add_model_arguments, check_model_source, load_model
from .options import RawDescriptionHelpFormatter, add_command, positive_int

DESCRIPTION = """\
Write an SSAH adapter in a format that servers load:

  lora    an exact peft LoRA adapter folder (vLLM --enable-lora, TGI, llama.cpp's convert_lora_to_gguf.py);
          refused when a module needs a rank above --max-rank, or the adapter trains modules_to_save
  merged  the base model with the adapter merged in, as a checkpoint folder with the tokenizer beside it

Without --model, the base model is the one the adapter records (base_model_name_or_path)."""


def register_export(subparsers: Any) -> None:
    """Add the ``export`` subcommand; it sets ``handler`` (args -> exit status)."""
    parser = add_command(
        subparsers,
        "export",
        "write an SSAH adapter as a peft LoRA adapter or a merged checkpoint, for vLLM, TGI or llama.cpp",
        DESCRIPTION,
        formatter_class=RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", help="SSAH adapter folder (as save_pretrained writes it) or hub id")
    parser.add_argument("--format", required=True, choices=tuple(EXPORT_FORMATS), help="what to write")
    parser.add_argument(
        "--out", required=True, type=Path, help="folder to write; must be new or empty unless --overwrite"
    )
    parser.add_argument(
        "--max-rank",
        type=positive_int,
        default=DEFAULT_MAX_RANK,
        help="--format lora: the largest LoRA rank allowed, your server's maximum (vLLM --max-lora-rank, at most 256)",
    )
    add_model_arguments(parser, dtype="auto")
    parser.set_defaults(model=None)
    parser.add_argument("--overwrite", action="store_true", help="replace the --out folder if it is not empty")
    parser.set_defaults(handler=run_export_command)


def run_export_command(args: argparse.Namespace) -> int:
    """Handler of ``ssah-peft export``: check, load the base model and the adapter, write ``--out``."""
    problem = output_folder_problem(args.out, args.overwrite)
    if problem is not None:
        raise CLIError(f"--out {problem}")
    check_model_source(args.adapter, "adapter", marker="adapter_config.json", what="peft adapter")
    with user_errors(args.adapter):
        config = PeftConfig.from_pretrained(args.adapter)
        if not isinstance(config, SSAHConfig):
            raise ValueError(
                f"{args.adapter} is a {config.peft_type.value} adapter, not an SSAH adapter; nothing to export"
            )
        if Path(args.adapter).is_dir():  # a hub adapter is checked once it is loaded
            EXPORT_FORMATS[args.format].check(
                config, stored_slice_counts(args.adapter), ExportOptions(max_rank=args.max_rank)
            )
    args.model = args.model or config.base_model_name_or_path
    if not args.model:
        raise CLIError(f"adapter {args.adapter} does not record its base model; give it with --model")
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    model, tokenizer = load_model(args)
    with loading(args.adapter, "adapter"):
        model = PeftModel.from_pretrained(model, args.adapter)
    with user_errors(args.adapter):
        out = export_adapter(
            model,
            args.out,
            args.format,
            overwrite=args.overwrite,
            max_rank=args.max_rank,
            tokenizer=tokenizer,
            base_model=args.model,
        )
    print(f"wrote {out}")
    return 0
