"""``ssah-peft units show|compare|migrate|merge-scores``: inspect unit maps, and make one from partial score files.

``show`` prints a map's summary (and plot), ``compare`` the overlap of two maps, ``migrate`` how units change type
between two maps, and ``merge-scores`` merges the partial score files of all shards (``score --shard R/W
--partial-out``) into a map.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TypeVar

from ..scoring import merge_partial_scores
from ..unit_map import UNIT_TYPES, UnitMap
from .classification import add_classification_arguments, check_classification_outputs, classify_and_save
from .errors import CLIError, user_errors
from .inputs import load_unit_map
from .options import add_command, add_overwrite_argument
from .paths import PNG, UNIT_MAP, check_output_file, check_safetensors_input

T = TypeVar("T")


def register_units(subparsers: Any) -> None:
    parser = add_command(subparsers, "units", "inspect and compare unit maps")
    commands = parser.add_subparsers(dest="units_command", required=True)
    show = add_command(commands, "show", "print a map's unit types per layer")
    show.add_argument("map", help="unit map file")
    show.add_argument("--plot", default=None, help="also write a PNG of unit types per layer (default: no plot)")
    add_overwrite_argument(show)
    show.set_defaults(handler=_show)
    compare = add_command(commands, "compare", "overlap (IoU) of each unit type in two maps of one model")
    compare.add_argument("map_a", help="unit map file")
    compare.add_argument("map_b", help="unit map file of the same model")
    compare.set_defaults(handler=_compare)
    migrate = add_command(commands, "migrate", "how units change type between two maps (e.g. before/after FT)")
    migrate.add_argument("map_a", metavar="before", help="unit map file, e.g. of the model before fine-tuning")
    migrate.add_argument("map_b", metavar="after", help="unit map file of the same model, e.g. after fine-tuning")
    migrate.set_defaults(handler=_migrate)
    merge = add_command(
        commands,
        "merge-scores",
        "merge the partial score files of all shards (`score --shard R/W --partial-out`) into a unit map",
    )
    merge.add_argument("partials", nargs="+", help="one partial score file per shard, in any order")
    merge.add_argument("--out", required=True, help="unit map file to write (.safetensors)")
    add_classification_arguments(merge)
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
    overlap = _two_maps(args, UnitMap.overlap)
    print("unit type  IoU")
    for unit_type in UNIT_TYPES:
        print(f"{unit_type:>9}  {overlap[unit_type]:.4f}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    print(_two_maps(args, UnitMap.migration).table())
    return 0


def _two_maps(args: argparse.Namespace, compare: Callable[[UnitMap, UnitMap], T]) -> T:
    """``compare(map_a, map_b)`` of the two maps of ``compare`` and ``migrate``; maps of two models are refused."""
    map_a, map_b = load_unit_map(args.map_a, "unit map"), load_unit_map(args.map_b, "unit map")
    with user_errors(args.map_b, also_named=[args.map_a]):
        return compare(map_a, map_b)


def _merge_scores(args: argparse.Namespace) -> int:
    check_classification_outputs(args, args.out, "--out", UNIT_MAP)
    for path in args.partials:
        check_safetensors_input(path, "partial score file")
    with user_errors("merging the partial score files", also_named=args.partials):
        scores = merge_partial_scores(args.partials)
    if scores.keys() != {"safety", "utility"}:
        raise CLIError(
            f"The partial score files hold the calibration sets {sorted(scores)}; a unit map needs 'safety' and "
            "'utility' (as `ssah-peft score --partial-out` writes)",
            1,
        )
    return classify_and_save(args, scores["safety"], scores["utility"])
