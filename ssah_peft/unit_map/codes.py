"""The vocabulary of unit maps: the unit types, their int8 codes, the default group sizes and the map's tensor types.

Its own module because the classification, the file format and the migration table all speak it, and none of them
should import another just for a constant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from ..units import BLOCK_KINDS, PerBlock, UnitsDict

UnitType = Literal["SCU", "UCU", "CU", "RU"]
#: The unit types; a type's position is its int8 code in saved maps.
UNIT_TYPES: tuple[str, ...] = ("CU", "SCU", "UCU", "RU")
UNIT_TYPE_NAMES = {"SCU": "safety-critical", "UCU": "utility-critical", "CU": "composite", "RU": "redundant"}
Ranking = Literal["global", "per_layer"]

#: Default group sizes as fractions of all units of a ranking scope, keyed by the arguments of
#: :meth:`~ssah_peft.UnitMap.from_scores`: the paper's Llama-2-7B-Chat figures (SCU 1.3%, UCU 13.3%, RU 14.8%).
#: The single source of these numbers for the library, the command line and the experiments.
DEFAULT_PROPORTIONS: Mapping[str, float] = MappingProxyType({"scu": 0.013, "ucu": 0.133, "ru": 0.148})

CU, SCU, UCU, RU = (UNIT_TYPES.index(t) for t in ("CU", "SCU", "UCU", "RU"))
#: The order in which tables list the types.
REPORT_ORDER: tuple[str, ...] = ("SCU", "UCU", "CU", "RU")

__all__ = [
    "DEFAULT_PROPORTIONS",
    "REPORT_ORDER",
    "UNIT_TYPES",
    "UNIT_TYPE_NAMES",
    "PerBlock",
    "Ranking",
    "UnitType",
    "UnitsDict",
    "code",
    "count",
    "ordered_kinds",
]


def code(unit_type: str) -> int:
    """The int8 code of a unit type; ``ValueError`` for an unknown one."""
    if unit_type not in UNIT_TYPES:
        raise ValueError(f"Unknown unit type {unit_type!r}; expected one of {UNIT_TYPES}")
    return UNIT_TYPES.index(unit_type)


def count(fraction: float, n: int) -> int:
    """The number of units a group of ``fraction`` of ``n`` units holds (rounded half up)."""
    return math.floor(fraction * n + 0.5)


def ordered_kinds(per_block: Mapping[str, Any]) -> tuple[str, ...]:
    """The block kinds of ``per_block`` in :data:`~ssah_peft.units.BLOCK_KINDS` order."""
    return tuple(k for k in BLOCK_KINDS if k in per_block)
