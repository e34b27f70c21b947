"""Unit maps: every unit of a model classified as safety-critical (SCU), utility-critical (UCU), composite (CU) or
redundant (RU) from its safety and utility scores (Li & Kim, arXiv 2410.10862, Sec. 4).

* :mod:`.codes`: the unit types, their codes and :data:`DEFAULT_PROPORTIONS`, the default group sizes;
* :mod:`.classification`: :class:`UnitMap`, the classification rules and the unit sets a map gives a config;
* :mod:`.file_format`: saving a map and checking a loaded file;
* :mod:`.report` and :mod:`.migration`: the text/figure summaries and the type migration between two maps;
* :mod:`.calibrated`: the one path from calibration data to a map (scoring, sharding and process groups, the
  metadata every map records about its data);
* :mod:`.selection`: a budget of units to protect or to train, by one rule for every scorer, and random units
  with the per-block counts of another choice (the controls).

Every name is importable from ``ssah_peft.unit_map``.
"""

from __future__ import annotations

from .calibrated import (
    CalibrationSet,
    CalibrationSettings,
    NoTokensToScore,
    calibration_key,
    calibration_metadata,
    calibration_statistics,
    launched_process_group,
    unit_map_from_calibration,
)
from .classification import UnitMap, check_model_fingerprint
from .codes import (
    DEFAULT_PROPORTIONS,
    UNIT_TYPE_NAMES,
    UNIT_TYPES,
    PerBlock,
    Ranking,
    UnitsDict,
    UnitType,
)
from .file_format import FILE_FORMAT, FILE_FORMAT_VERSION
from .migration import Migration
from .selection import (
    ALLOCATIONS,
    PROTECTION_RULES,
    PURPOSES,
    Allocation,
    ProtectionRule,
    Purpose,
    choose_units,
    complement_units,
    counts_per_block,
    random_units_with_counts,
    unit_widths,
)

__all__ = [
    "ALLOCATIONS",
    "CalibrationSet",
    "CalibrationSettings",
    "NoTokensToScore",
    "calibration_key",
    "calibration_metadata",
    "calibration_statistics",
    "launched_process_group",
    "unit_map_from_calibration",
    "PROTECTION_RULES",
    "PURPOSES",
    "Allocation",
    "ProtectionRule",
    "Purpose",
    "choose_units",
    "complement_units",
    "counts_per_block",
    "random_units_with_counts",
    "unit_widths",
    "DEFAULT_PROPORTIONS",
    "FILE_FORMAT",
    "FILE_FORMAT_VERSION",
    "UNIT_TYPES",
    "UNIT_TYPE_NAMES",
    "Migration",
    "PerBlock",
    "Ranking",
    "UnitMap",
    "UnitType",
    "UnitsDict",
    "check_model_fingerprint",
]
