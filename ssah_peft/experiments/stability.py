"""How stable the unit sets are: the intersection over union (IoU) of each unit type between maps of one model
scored on two disjoint halves of the calibration data, and by another scorer.

A module of its own because the question is the paper's reviewers' (do the SCU and RU depend on which calibration
prompts were drawn, or on the scorer?) and its answer is a table of its own in the demo report: a unit set that
changes with half of its data is a weak basis for freezing or training exactly those units. The IoU is
:meth:`ssah_peft.UnitMap.overlap`; this module chooses the maps to compare and keeps the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .._files import read_json, write_json
from ..unit_map import UnitMap
from ..unit_map.codes import REPORT_ORDER

#: The unit types the demo's table shows: those the methods freeze or train.
STABILITY_TYPES: tuple[str, ...] = ("SCU", "RU")


@dataclass
class StabilityRow:
    """IoU per unit type between two maps of one model."""

    comparison: str
    """What differs between the two maps, e.g. ``"calibration halves (variance)"``."""
    iou: dict[str, float]


@dataclass
class StabilityTable:
    """One row per pair of maps compared (``units/stability.json`` in a demo run)."""

    rows: list[StabilityRow] = field(default_factory=list)

    def markdown(self, types: Sequence[str] = STABILITY_TYPES) -> str:
        lines = [f"| maps compared | {' | '.join(f'IoU {t}' for t in types)} |", f"|---|{'---:|' * len(types)}"]
        for row in self.rows:
            lines.append(f"| {row.comparison} | {' | '.join(f'{row.iou[t]:.3f}' for t in types)} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [{"comparison": r.comparison, "iou": r.iou} for r in self.rows]}

    def save(self, path: Union[str, Path]) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path]) -> StabilityTable:
        return cls([StabilityRow(r["comparison"], r["iou"]) for r in read_json(path)["rows"]])


def iou_row(comparison: str, first: UnitMap, second: UnitMap) -> StabilityRow:
    """The IoU of every unit type (report order) between two maps of one model."""
    overlap = first.overlap(second)
    return StabilityRow(comparison, {t: overlap[t] for t in REPORT_ORDER})


def stability_table(
    score: Callable[..., UnitMap], full_map: UnitMap, rival_scorers: Sequence[str] = ("wanda",)
) -> StabilityTable:
    """Compare maps that ``score(method=..., half=...)`` makes of one model at one set of proportions.

    Rows: the maps of the two disjoint calibration halves (the paper's variance score), and ``full_map`` (variance,
    all calibration data) against the map of each of ``rival_scorers`` on the same data. SNIP needs a backward pass
    per sequence and is left out of the demo's default.
    """
    halves = [score(method="variance", half=half) for half in (0, 1)]
    rows = [iou_row("calibration halves (variance)", *halves)]
    for scorer in rival_scorers:
        rows.append(iou_row(f"variance vs {scorer} (all calibration data)", full_map, score(method=scorer, half=None)))
    return StabilityTable(rows)
