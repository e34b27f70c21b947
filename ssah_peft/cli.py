"""The ``ssah-peft`` command line.

Every command is added by a ``register(subparsers)`` function listed in :data:`COMMANDS`; it creates its
subparser and sets ``handler`` (``args -> exit status``) as a default. Another module adds a command by writing
such a function and listing it here.

* ``ssah-peft score``: score a model on safety and utility data and write a unit map.
* ``ssah-peft units show|compare|migrate``: print a map's summary (and plot), the overlap of two maps, or the
  migration of unit types between two maps.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from .scoring import (
    PLAIN_CHAT_TEMPLATE,
    SCORING_METHODS,
    TOKEN_SELECTIONS,
    UnitScores,
    build_calibration_batches,
    score_units,
)
from .analysis import register_ablate, register_probe, register_report, register_scan
from .demo import register_demo
from .evaluate import register_cli as register_eval
from .unit_map import UNIT_TYPES, UnitMap

Registrar = Callable[[Any], None]
DTYPES = ("float32", "bfloat16", "float16")


def read_pairs(source: str, limit: Optional[int] = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs, in order, from a JSONL file with ``"prompt"`` and ``"response"`` fields or from a
    built-in data set named in :data:`ssah_peft.data.BUILTIN_DATASETS` (e.g. ``"safety_calibration"``)."""
    if Path(source).is_file():
        records = _jsonl_records(source)
    else:
        from .data import BUILTIN_DATASETS, load_builtin

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


def _jsonl_records(path: str) -> list[tuple[str, Any]]:
    """``(where, record)`` for every non-blank line of a JSONL file; ``where`` is ``path:line``."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
    return records


# ----------------------------------------------------------------------------------------------------
# ssah-peft score
# ----------------------------------------------------------------------------------------------------


def register_score(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score units on safety and utility data and write a unit map",
        description="Score every unit of a causal LM on safety and on utility calibration data and classify the "
        "units (SCU/UCU/CU/RU) into a unit map file.",
    )
    parser.add_argument(
        "--model", required=True, help="embedded model name (smollm2-135m-instruct), local path or hub id"
    )
    parser.add_argument(
        "--safety-data", required=True, help="JSONL file with prompt/response fields, or a built-in data set name"
    )
    parser.add_argument(
        "--utility-data", required=True, help="JSONL file with prompt/response fields, or a built-in data set name"
    )
    parser.add_argument("--out", required=True, help="unit map file to write (.safetensors)")
    parser.add_argument("--method", choices=SCORING_METHODS, default="variance")
    parser.add_argument("--tokens", choices=TOKEN_SELECTIONS, default="response", help="tokens to score")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-samples", type=int, default=None, help="use at most this many examples per data set")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model (and 4-bit compute) dtype")
    parser.add_argument("--device-map", default=None, help="transformers device_map, e.g. 'auto' or 'cuda:0'")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the model in bitsandbytes NF4")
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--chat-template", default=None, help="file with a Jinja chat template to use")
    template.add_argument(
        "--plain-chat-template", action="store_true", help="use 'User: ...\\nAssistant: ...' (base models)"
    )
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--scu", type=float, default=0.013, help="fraction of units that are SCU")
    parser.add_argument("--ucu", type=float, default=0.133, help="fraction of units that are UCU")
    parser.add_argument("--ru", type=float, default=0.148, help="fraction of units that are RU")
    parser.add_argument("--standardize", action="store_true", help="z-score scores within each layer first")
    parser.add_argument("--ranking", choices=("global", "per_layer"), default="global")
    parser.add_argument("--composite-fraction", type=float, default=0.0, help="top CU protected with the SCU")
    parser.add_argument("--plot", default=None, help="also write a PNG of unit types per layer")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=_score)


def _score(args: argparse.Namespace) -> int:
    import torch

    from .models import load as load_model

    # read everything that can be wrong before loading a large model
    data = {"safety": read_pairs(args.safety_data, args.num_samples)}
    data["utility"] = read_pairs(args.utility_data, args.num_samples)
    if args.chat_template is not None:
        chat_template: Optional[str] = Path(args.chat_template).read_text(encoding="utf-8")
        template_name = args.chat_template
    elif args.plain_chat_template:
        chat_template, template_name = PLAIN_CHAT_TEMPLATE, "plain"
    else:
        chat_template, template_name = None, "tokenizer"
    device_map = args.device_map
    if args.load_in_4bit and device_map is None:
        device_map = "auto" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(
        args.model, dtype=getattr(torch, args.dtype), device_map=device_map, load_in_4bit=args.load_in_4bit
    )

    scores: dict[str, UnitScores] = {}
    for name, pairs in data.items():
        batches = build_calibration_batches(
            tokenizer,
            pairs,
            tokens=args.tokens,
            batch_size=args.batch_size,
            max_length=args.max_length,
            chat_template=chat_template,
            system_prompt=args.system_prompt,
        )
        metadata = {
            "data": args.safety_data if name == "safety" else args.utility_data,
            "num_examples": len(pairs),
            "tokens": args.tokens,
            "max_length": args.max_length,
            "chat_template": template_name,
            "system_prompt": args.system_prompt,
            "model": args.model,
            "dtype": args.dtype,
            "load_in_4bit": args.load_in_4bit,
        }
        scores[name] = score_units(
            model, batches, method=args.method, show_progress_bar=not args.no_progress, metadata=metadata
        )
    unit_map = UnitMap.from_scores(
        scores["safety"],
        scores["utility"],
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
    parser = subparsers.add_parser("units", help="inspect and compare unit maps")
    commands = parser.add_subparsers(dest="units_command", required=True)
    show = commands.add_parser("show", help="print a map's unit types per layer")
    show.add_argument("map", help="unit map file")
    show.add_argument("--plot", default=None, help="also write a PNG of unit types per layer")
    show.set_defaults(handler=_show)
    compare = commands.add_parser("compare", help="overlap (IoU) of each unit type in two maps of one model")
    compare.add_argument("map_a")
    compare.add_argument("map_b")
    compare.set_defaults(handler=_compare)
    migrate = commands.add_parser("migrate", help="how units change type between two maps (e.g. before/after FT)")
    migrate.add_argument("before")
    migrate.add_argument("after")
    migrate.set_defaults(handler=_migrate)


def _show(args: argparse.Namespace) -> int:
    unit_map = UnitMap.load(args.map)
    print(unit_map.summary())
    print("calibration:", json.dumps(unit_map.calibration, indent=2))
    if args.plot:
        print(f"wrote {unit_map.plot(args.plot)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    overlap = UnitMap.load(args.map_a).overlap(UnitMap.load(args.map_b))
    print("unit type  IoU")
    for unit_type in UNIT_TYPES:
        print(f"{unit_type:>9}  {overlap[unit_type]:.4f}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    migration = UnitMap.load(args.before).migration(UnitMap.load(args.after))
    print(migration.table())
    return 0


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

#: The functions that add the commands, in help order.
COMMANDS: list[Registrar] = [
    register_score, register_units, register_eval, register_probe, register_ablate, register_scan, register_report,
    register_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssah-peft", description="Safety-aware sparse fine-tuning tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ssah-peft`` with ``argv`` (default: the process arguments); returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
