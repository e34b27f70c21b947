"""The classification option set: how scores become unit types (``--scu``, ``--ucu``, ``--ru``, ``--standardize``,
``--ranking``, ``--composite-fraction``) and the map and figure written from them.

Shared by the commands that write a unit map from scores (``score``, ``units merge-scores``): declared, checked and
applied here once. The defaults are the library's (:data:`ssah_peft.unit_map.DEFAULT_PROPORTIONS`).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from ..scoring import UnitScores
from ..unit_map import DEFAULT_PROPORTIONS, UnitMap
from .errors import CLIError
from .options import add_overwrite_argument, fraction
from .paths import PNG, check_distinct, check_output_file

#: The options of this set that are settings of :meth:`UnitMap.from_scores` (``--composite-fraction`` is
#: ``composite_fraction``), by their argparse names.
SETTINGS = ("scu", "ucu", "ru", "standardize", "ranking", "composite_fraction")


def add_classification_arguments(parser: argparse.ArgumentParser) -> None:
    """How scores become unit types, for every command that writes a map; also ``--plot`` and ``--overwrite``."""
    for group in ("scu", "ucu", "ru"):
        text = f"fraction of units that are {group.upper()}"
        parser.add_argument(f"--{group}", type=fraction, default=DEFAULT_PROPORTIONS[group], help=text)
    parser.add_argument("--standardize", action="store_true", help="z-score scores within each layer first")
    parser.add_argument(
        "--ranking",
        choices=("global", "per_layer"),
        default="global",
        help="rank all units of the model together, or each layer's block separately",
    )
    parser.add_argument(
        "--composite-fraction",
        type=fraction,
        default=0.0,
        help="fraction of all units, the most safety-leaning CU, that protect mode freezes with the SCU",
    )
    parser.add_argument("--plot", default=None, help="also write a PNG of unit types per layer (default: no plot)")
    add_overwrite_argument(parser)


def check_unit_fractions(scu: float, ucu: float, ru: float, composite_fraction: float = 0.0) -> None:
    """The group sizes of a classification (each already in [0, 1] by :func:`fraction`) fit into all units."""
    total = scu + ucu + ru
    if total > 1.0 + 1e-9:
        raise CLIError(
            f"--scu + --ucu + --ru = {scu} + {ucu} + {ru} = {total:g} exceeds 1 (all units); make the groups smaller"
        )
    if composite_fraction > 1.0 - total + 1e-9:
        raise CLIError(
            f"--composite-fraction {composite_fraction} exceeds the share of composite units, 1 - (--scu + --ucu + "
            f"--ru) = {1.0 - total:g}; lower it or make the groups smaller"
        )


def check_classification_outputs(args: argparse.Namespace, out: Optional[str], out_option: str, kind: str) -> None:
    """The group sizes and the output files of a command that writes a map (or partial scores) and a plot."""
    check_unit_fractions(args.scu, args.ucu, args.ru, args.composite_fraction)
    check_output_file(out, out_option, kind, overwrite=args.overwrite)
    check_output_file(args.plot, "--plot", PNG, overwrite=args.overwrite, example="unit_types.png")
    check_distinct(**{out_option: out, "--plot": args.plot})


def classification_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options of this set as the keyword arguments of :meth:`UnitMap.from_scores`."""
    return {name: getattr(args, name) for name in SETTINGS}


def classify_and_save(args: argparse.Namespace, safety: UnitScores, utility: UnitScores) -> int:
    """Classify the units as the options say, write the map to ``--out`` (and ``--plot``) and print its summary."""
    return save_unit_map(args, UnitMap.from_scores(safety, utility, **classification_of(args)))


def save_unit_map(args: argparse.Namespace, unit_map: UnitMap) -> int:
    """Write ``unit_map`` to ``--out`` (and ``--plot``) and print its summary."""
    unit_map.save(args.out)
    print(unit_map.summary())
    print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {unit_map.plot(args.plot)}")
    return 0
