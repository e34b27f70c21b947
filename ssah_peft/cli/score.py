"""``ssah-peft score``: score a model on safety and utility data and write a unit map.

Under ``torchrun`` or ``accelerate launch`` the processes share the data and write one map; ``--shard`` with
``--partial-out`` scores one part of the data in an independent job instead (merged by ``ssah-peft units
merge-scores``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..models import EMBEDDED_MODELS
from ..scoring import SCORING_METHODS, TOKEN_SELECTIONS, save_partial_scores
from ..unit_map import (
    CalibrationSet,
    CalibrationSettings,
    NoTokensToScore,
    calibration_statistics,
    launched_process_group,
    unit_map_from_calibration,
)
from .classification import (
    add_classification_arguments,
    check_classification_outputs,
    classification_of,
    save_unit_map,
)
from .errors import CLIError, user_errors
from .inputs import read_pairs
from .model_options import add_model_arguments, chat_template, check_model_source, load_model
from .options import add_command, add_progress_argument, positive_int
from .paths import PARTIAL_SCORES, UNIT_MAP

DATA_HELP = "JSONL file with prompt/response fields, or a built-in data set name"


def register_score(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "score",
        "score units on safety and utility data and write a unit map",
        "Score every unit of a causal LM on safety and on utility calibration data and classify the units "
        "(SCU/UCU/CU/RU) into a unit map file.",
    )
    add_model_arguments(parser, required=True, chat_template=True, system_prompt=True)
    parser.add_argument("--safety-data", required=True, help=DATA_HELP)
    parser.add_argument("--utility-data", required=True, help=DATA_HELP)
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--out", help="unit map file to write (.safetensors); this or --partial-out is required")
    output.add_argument(
        "--partial-out",
        help="write this shard's raw statistics (.safetensors) instead of a map; merge the files of all shards "
        "with `ssah-peft units merge-scores`; this or --out is required",
    )
    parser.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="RANK/WORLD",
        help="with --partial-out: score only examples RANK, RANK+WORLD, ... of each data set, e.g. 0/4 "
        "(default: all examples)",
    )
    parser.add_argument("--method", choices=SCORING_METHODS, default="variance", help="unit scoring method")
    parser.add_argument("--tokens", choices=TOKEN_SELECTIONS, default="response", help="tokens to score")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass")
    parser.add_argument("--max-length", type=positive_int, default=512, help="truncate examples to this many tokens")
    parser.add_argument(
        "--num-samples",
        type=positive_int,
        default=None,
        help="use at most this many examples per data set (default: all)",
    )
    add_classification_arguments(parser)
    add_progress_argument(parser)
    parser.set_defaults(handler=_score)


def _shard(text: str) -> tuple[int, int]:
    """``--shard RANK/WORLD`` as ``(rank, world size)``."""
    try:
        rank, world_size = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK/WORLD such as 0/4, got {text!r}") from None
    if not 0 <= rank < world_size:
        raise argparse.ArgumentTypeError(f"RANK must be in 0..WORLD-1, got {text!r}")
    return rank, world_size


def _score(args: argparse.Namespace) -> int:
    # check everything that can be wrong before loading a large model
    if args.shard is not None and args.partial_out is None:
        raise CLIError("--shard scores part of the data: write it with --partial-out, then merge all shards")
    if args.partial_out is not None:
        check_classification_outputs(args, args.partial_out, "--partial-out", PARTIAL_SCORES)
    else:
        check_classification_outputs(args, args.out, "--out", UNIT_MAP)
    data = {}
    for name, source in (("safety", args.safety_data), ("utility", args.utility_data)):
        with user_errors(source):
            data[name] = CalibrationSet(source, read_pairs(source, args.num_samples))
    template, template_name = chat_template(args)
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    settings = CalibrationSettings(
        method=args.method,
        tokens=args.tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat_template=template,
        chat_template_name=template_name,
        system_prompt=args.system_prompt,
    )
    model_source = {"model": args.model, "dtype": args.dtype, "load_in_4bit": args.load_in_4bit}
    with launched_process_group() as (rank, world_size):
        if world_size > 1 and args.partial_out is not None:
            raise CLIError(
                "--partial-out is for shards scored by independent jobs; under torchrun or accelerate launch the "
                "processes merge their statistics themselves: use --out"
            )
        model, tokenizer = load_model(args)
        scoring = dict(model_source=model_source, show_progress=not args.no_progress)
        try:
            if args.partial_out is not None:
                statistics = calibration_statistics(
                    model, tokenizer, data["safety"], data["utility"], settings, shard=args.shard, **scoring
                )
            else:
                unit_map = unit_map_from_calibration(
                    model,
                    tokenizer,
                    data["safety"],
                    data["utility"],
                    settings,
                    **scoring,
                    classification=classification_of(args),
                )
        except NoTokensToScore as error:
            raise CLIError(
                f"{error.source}: record(s) {error.listed()} leave no token to score (--tokens {args.tokens}): "
                f"--max-length {args.max_length} cuts them off within the prompt; raise --max-length, or shorten or "
                "leave out these records",
                1,
            ) from None
    if rank != 0:  # every process holds the merged statistics; one writes
        return 0
    if args.partial_out is not None:
        shard_rank, shard_count = args.shard or (0, 1)
        save_partial_scores(args.partial_out, statistics, rank=shard_rank, world_size=shard_count)
        print(f"wrote {args.partial_out} (shard {shard_rank}/{shard_count})")
        return 0
    if world_size > 1:
        print(f"merged the statistics of {world_size} processes")
    return save_unit_map(args, unit_map)
