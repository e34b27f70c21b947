"""How units change type between two maps of one model (the paper's Sec. 5.3: before and after fine-tuning).

Its own module because a :class:`Migration` is a result of comparing maps, read and printed on its own (the
``ssah-peft units migrate`` command, the analysis figures), not a part of a map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codes import REPORT_ORDER, UnitType, code
from .report import text_table


@dataclass(frozen=True, eq=False)
class Migration:
    """Counts of units moving from type ``UNIT_TYPES[i]`` (before) to ``UNIT_TYPES[j]`` (after): ``counts[i, j]``."""

    counts: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def percent(self) -> torch.Tensor:
        """``counts`` as percentages of all units."""
        return 100.0 * self.counts.double() / self.total

    def moved(self, before: UnitType, after: UnitType) -> int:
        return int(self.counts[code(before), code(after)])

    def table(self) -> str:
        """Text matrix, rows = type before, columns = type after, cells = count (% of all units)."""
        percent = self.percent
        rows = [
            [a, *(f"{self.moved(a, b)} ({percent[code(a), code(b)]:.2f}%)" for b in REPORT_ORDER)] for a in REPORT_ORDER
        ]
        return text_table(["before \\ after", *REPORT_ORDER], rows)
