"""The ``ssah-peft`` command line.

Every command is added by a ``register(subparsers)`` function listed in :data:`COMMANDS`; it creates its
subparser and sets ``handler`` (``args -> exit status``) as a default. Another module adds a command by writing
such a function and listing it here.

* ``ssah-peft score``: score a model on safety and utility data and write a unit map. Under ``torchrun`` or
  ``accelerate launch`` the processes share the data and write one map; ``--shard``/``--partial-out`` score one
  part of the data in an independent job instead.
* ``ssah-peft units show|compare|migrate|merge-scores``: print a map's summary (and plot), the overlap of two
  maps, the migration of unit types between two maps, or merge the partial score files of all shards into a map.

Every command checks its options, inputs and outputs before loading a model, and :func:`main` reports a user
error as ``ssah-peft: error: ...`` without a traceback (:mod:`ssah_peft.cli.checks`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from ..scoring import (
    PLAIN_CHAT_TEMPLATE,
    SCORING_METHODS,
    TOKEN_SELECTIONS,
    UnitScores,
    UnitStatistics,
    build_calibration_batches,
    calibration_data_hash,
    merge_partial_scores,
    save_partial_scores,
    unit_statistics,
)
from .analysis import register_ablate, register_probe, register_report, register_scan
from .checks import (
    MODEL_HELP,
    PARTIAL_SCORES,
    PNG,
    UNIT_MAP,
    CLIError,
    HelpFormatter,
    add_overwrite_argument,
    check_distinct,
    check_input_file,
    check_model_source,
    check_output_file,
    check_safetensors_input,
    check_unit_fractions,
    fraction,
    jsonl_records,
    load_unit_map,
    loading,
    positive_int,
    read_text,
    run_command,
    user_errors,
)
from .demo import register_demo
from .evaluate import register as register_eval
from ..unit_map import UNIT_TYPES, UnitMap

Registrar = Callable[[Any], None]
DTYPES = ("float32", "bfloat16", "float16")


def read_pairs(source: str, limit: Optional[int] = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs, in order, from a JSONL file with ``"prompt"`` and ``"response"`` fields or from a
    built-in data set named in :data:`ssah_peft.data.BUILTIN_DATASETS` (e.g. ``"safety_calibration"``)."""
    if Path(source).is_file():
        records = jsonl_records(source)
    else:
        from ..data import BUILTIN_DATASETS, load_builtin

        if source not in BUILTIN_DATASETS:
            raise FileNotFoundError(
                f"Calibration data {source!r} is neither a file (JSONL with prompt/response fields) nor a built-in "
                f"data set ({sorted(BUILTIN_DATASETS)})"
            )
        records = [(f"{source}[{i}]", record) for i, record in enumerate(load_builtin(source))]
    pairs = []
    for where, record in records[:limit]:
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "response")):
            raise ValueError(f"{where}: expected a JSON object with 'prompt' and 'response' fields")
        pairs.append((record["prompt"], record["response"]))
    if not pairs:
        raise ValueError(f"Calibration data {source!r} holds no examples")
    return pairs


# ----------------------------------------------------------------------------------------------------
# ssah-peft score
# ----------------------------------------------------------------------------------------------------


def register_score(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score units on safety and utility data and write a unit map",
        description="Score every unit of a causal LM on safety and on utility calibration data and classify the "
        "units (SCU/UCU/CU/RU) into a unit map file.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--safety-data", required=True,
        help="JSONL file with prompt/response fields, or a built-in data set name",
    )
    parser.add_argument(
        "--utility-data", required=True,
        help="JSONL file with prompt/response fields, or a built-in data set name",
    )
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
        "--num-samples", type=positive_int, default=None,
        help="use at most this many examples per data set (default: all)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model (and 4-bit compute) dtype")
    parser.add_argument(
        "--device-map", default=None,
        help="transformers device_map, e.g. 'auto' or 'cuda:0' (default: one device; cpu with --load-in-4bit and no "
        "GPU, auto with one)",
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="load the model in bitsandbytes NF4")
    template = parser.add_mutually_exclusive_group()
    template.add_argument(
        "--chat-template", default=None,
        help="file with a Jinja chat template to use (default: the tokenizer's template)",
    )
    template.add_argument(
        "--plain-chat-template", action="store_true", help="use 'User: ...\\nAssistant: ...' (base models)"
    )
    parser.add_argument(
        "--system-prompt", default=None, help="system turn of every example (default: the chat template's)"
    )
    _add_classification_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=_score)


def _add_classification_arguments(parser: argparse.ArgumentParser) -> None:
    """How scores become unit types, for every command that writes a map."""
    parser.add_argument("--scu", type=fraction, default=0.013, help="fraction of units that are SCU")
    parser.add_argument("--ucu", type=fraction, default=0.133, help="fraction of units that are UCU")
    parser.add_argument("--ru", type=fraction, default=0.148, help="fraction of units that are RU")
    parser.add_argument("--standardize", action="store_true", help="z-score scores within each layer first")
    parser.add_argument(
        "--ranking", choices=("global", "per_layer"), default="global",
        help="rank all units of the model together, or each layer's block separately",
    )
    parser.add_argument(
        "--composite-fraction", type=fraction, default=0.0,
        help="fraction of all units, the most safety-leaning CU, that protect mode freezes with the SCU",
    )
    parser.add_argument("--plot", default=None, help="also write a PNG of unit types per layer (default: no plot)")
    add_overwrite_argument(parser)


def _check_classification_outputs(args: argparse.Namespace, out: Optional[str], out_option: str, kind: str) -> None:
    """The group sizes and the output files of a command that writes a map (or partial scores) and a plot."""
    check_unit_fractions(args.scu, args.ucu, args.ru, args.composite_fraction)
    check_output_file(out, out_option, kind, overwrite=args.overwrite)
    check_output_file(args.plot, "--plot", PNG, overwrite=args.overwrite, example="unit_types.png")
    check_distinct(**{out_option: out, "--plot": args.plot})


def _shard(text: str) -> tuple[int, int]:
    """``--shard RANK/WORLD`` as ``(rank, world size)``."""
    try:
        rank, world_size = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK/WORLD such as 0/4, got {text!r}") from None
    if not 0 <= rank < world_size:
        raise argparse.ArgumentTypeError(f"RANK must be in 0..WORLD-1, got {text!r}")
    return rank, world_size


@contextmanager
def _process_group() -> Iterator[tuple[int, int]]:
    """``(rank, world size)`` of this process among those a launcher started.

    ``torchrun`` and ``accelerate launch`` start every process with ``WORLD_SIZE``, ``RANK`` and a rendezvous
    address in the environment; the group is joined from them (nccl with CUDA, each process on GPU
    ``LOCAL_RANK``; gloo on CPU) and left on exit. A group the caller initialized is used and kept.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, 1
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _score(args: argparse.Namespace) -> int:
    import torch

    from ..models import EMBEDDED_MODELS
    from ..models import load as load_model

    # check everything that can be wrong before loading a large model
    if args.shard is not None and args.partial_out is None:
        raise CLIError("--shard scores part of the data: write it with --partial-out, then merge all shards")
    if args.partial_out is not None:
        _check_classification_outputs(args, args.partial_out, "--partial-out", PARTIAL_SCORES)
    else:
        _check_classification_outputs(args, args.out, "--out", UNIT_MAP)
    data = {}
    for name, source in (("safety", args.safety_data), ("utility", args.utility_data)):
        with user_errors(source):
            data[name] = read_pairs(source, args.num_samples)
    if args.chat_template is not None:
        check_input_file(args.chat_template, "--chat-template")
        with user_errors(args.chat_template):
            chat_template: Optional[str] = read_text(args.chat_template)
        template_name = args.chat_template
    elif args.plain_chat_template:
        chat_template, template_name = PLAIN_CHAT_TEMPLATE, "plain"
    else:
        chat_template, template_name = None, "tokenizer"
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    with _process_group() as (rank, world_size):
        if world_size > 1 and args.partial_out is not None:
            raise CLIError(
                "--partial-out is for shards scored by independent jobs; under torchrun or accelerate launch the "
                "processes merge their statistics themselves: use --out"
            )
        shard_rank, shard_count = (rank, world_size) if world_size > 1 else (args.shard or (0, 1))
        device_map = args.device_map
        if device_map is None and world_size > 1 and torch.cuda.is_available():
            device_map = f"cuda:{torch.cuda.current_device()}"  # one GPU per process
        if args.load_in_4bit and device_map is None:
            device_map = "auto" if torch.cuda.is_available() else "cpu"
        with loading(args.model):
            model, tokenizer = load_model(
                args.model, dtype=getattr(torch, args.dtype), device_map=device_map, load_in_4bit=args.load_in_4bit
            )

        statistics: dict[str, UnitStatistics] = {}
        for name, pairs in data.items():
            # whole examples per shard: batching and padding never change the statistics, so the shards' batches
            # need not line up with those of a single run
            shard = pairs[shard_rank::shard_count]
            batches: list[dict[str, torch.Tensor]] = []
            if shard:  # a shard left without examples contributes nothing to the merge
                batches = build_calibration_batches(
                    tokenizer,
                    shard,
                    tokens=args.tokens,
                    batch_size=args.batch_size,
                    max_length=args.max_length,
                    chat_template=chat_template,
                    system_prompt=args.system_prompt,
                )
            metadata = {
                "data": args.safety_data if name == "safety" else args.utility_data,
                "num_examples": len(pairs),
                "data_sha256": calibration_data_hash(pairs),  # the whole set: shards of changed data do not merge
                "tokens": args.tokens,
                "max_length": args.max_length,
                "chat_template": template_name,
                "system_prompt": args.system_prompt,
                "model": args.model,
                "dtype": args.dtype,
                "load_in_4bit": args.load_in_4bit,
            }
            statistics[name] = unit_statistics(
                model,
                batches,
                method=args.method,
                show_progress_bar=not args.no_progress and rank == 0,
                metadata=metadata,
            )
    if rank != 0:  # every process holds the merged statistics; one writes
        return 0
    if args.partial_out is not None:
        save_partial_scores(args.partial_out, statistics, rank=shard_rank, world_size=shard_count)
        print(f"wrote {args.partial_out} (shard {shard_rank}/{shard_count})")
        return 0
    if world_size > 1:
        print(f"merged the statistics of {world_size} processes")
    return _write_unit_map(args, statistics["safety"].finalize(), statistics["utility"].finalize())


def _write_unit_map(args: argparse.Namespace, safety: UnitScores, utility: UnitScores) -> int:
    unit_map = UnitMap.from_scores(
        safety,
        utility,
        scu=args.scu,
        ucu=args.ucu,
        ru=args.ru,
        standardize=args.standardize,
        ranking=args.ranking,
        composite_fraction=args.composite_fraction,
    )
    unit_map.save(args.out)
    print(unit_map.summary())
    print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {unit_map.plot(args.plot)}")
    return 0


# ----------------------------------------------------------------------------------------------------
# ssah-peft units show | compare | migrate
# ----------------------------------------------------------------------------------------------------


def register_units(subparsers: Any) -> None:
    parser = subparsers.add_parser("units", help="inspect and compare unit maps", formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="units_command", required=True)
    show = commands.add_parser("show", help="print a map's unit types per layer", formatter_class=HelpFormatter)
    show.add_argument("map", help="unit map file")
    show.add_argument("--plot", default=None, help="also write a PNG of unit types per layer (default: no plot)")
    add_overwrite_argument(show)
    show.set_defaults(handler=_show)
    compare = commands.add_parser(
        "compare", help="overlap (IoU) of each unit type in two maps of one model", formatter_class=HelpFormatter
    )
    compare.add_argument("map_a", help="unit map file")
    compare.add_argument("map_b", help="unit map file of the same model")
    compare.set_defaults(handler=_compare)
    migrate = commands.add_parser(
        "migrate", help="how units change type between two maps (e.g. before/after FT)", formatter_class=HelpFormatter
    )
    migrate.add_argument("before", help="unit map file, e.g. of the model before fine-tuning")
    migrate.add_argument("after", help="unit map file of the same model, e.g. after fine-tuning")
    migrate.set_defaults(handler=_migrate)
    merge = commands.add_parser(
        "merge-scores",
        help="merge the partial score files of all shards (`score --shard R/W --partial-out`) into a unit map",
        formatter_class=HelpFormatter,
    )
    merge.add_argument("partials", nargs="+", help="one partial score file per shard, in any order")
    merge.add_argument("--out", required=True, help="unit map file to write (.safetensors)")
    _add_classification_arguments(merge)
    merge.set_defaults(handler=_merge_scores)


def _show(args: argparse.Namespace) -> int:
    check_output_file(args.plot, "--plot", PNG, overwrite=args.overwrite, example="unit_types.png")
    unit_map = load_unit_map(args.map, "unit map")
    print(unit_map.summary())
    print("calibration:", json.dumps(unit_map.calibration, indent=2))
    if args.plot:
        print(f"wrote {unit_map.plot(args.plot)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    map_a, map_b = load_unit_map(args.map_a, "unit map"), load_unit_map(args.map_b, "unit map")
    with user_errors(args.map_b, also_named=[args.map_a]):
        overlap = map_a.overlap(map_b)
    print("unit type  IoU")
    for unit_type in UNIT_TYPES:
        print(f"{unit_type:>9}  {overlap[unit_type]:.4f}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    before, after = load_unit_map(args.before, "unit map"), load_unit_map(args.after, "unit map")
    with user_errors(args.after, also_named=[args.before]):
        migration = before.migration(after)
    print(migration.table())
    return 0


def _merge_scores(args: argparse.Namespace) -> int:
    _check_classification_outputs(args, args.out, "--out", UNIT_MAP)
    for path in args.partials:
        check_safetensors_input(path, "partial score file")
    with user_errors("merging the partial score files", also_named=args.partials):
        scores = merge_partial_scores(args.partials)
    if scores.keys() != {"safety", "utility"}:
        raise CLIError(
            f"The partial score files hold the calibration sets {sorted(scores)}; a unit map needs 'safety' and "
            "'utility' (as `ssah-peft score --partial-out` writes)", 1
        )
    return _write_unit_map(args, scores["safety"], scores["utility"])


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

#: The functions that add the commands, in help order.
COMMANDS: list[Registrar] = [
    register_score, register_units, register_eval, register_probe, register_ablate, register_scan, register_report,
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
    stderr and status 2 (options, paths) or 1 (file contents); see :mod:`ssah_peft.cli.checks`.
    """
    parser = build_parser()
    return run_command(parser, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
