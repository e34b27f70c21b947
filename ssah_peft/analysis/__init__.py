"""Analysis tools after Li & Kim (arXiv 2410.10862): what the unit types are for, and how the model reasons.

* :func:`probe_reasoning_direction`: does a harmful query's hidden state lean towards refusal or compliance?
* :func:`ablate`, :func:`random_units_like`, :func:`ablation_table`: zero unit sets reversibly; the paper's Table 1.
* :func:`draw_sets`, :func:`draw_comparisons`: a unit type against independent random draws of its counts.
* :func:`degradation_scan`: size the unit groups by pruning until safety or utility changes.
* figures (PNG + CSV) and :func:`build_report` for a run directory (convention in :mod:`.report`).
"""

from .ablation import (
    DRAW_MEASURES,
    GENERATION_MEASURES,
    AblationRow,
    AblationTable,
    UnitSet,
    ablate,
    ablation_table,
    draw_comparisons,
    draw_name,
    draw_sets,
    random_units_like,
    units_dict,
)
from .figures import plot_ablation, plot_migration, plot_probe, plot_scan, plot_unit_types
from .probe import DEFAULT_COMPLIANCE_OPENINGS, DEFAULT_REFUSAL_OPENINGS, ProbeResult, probe_reasoning_direction
from .report import build_report
from .scan import CRITERIA, ScanResult, cheap_metrics, degradation_scan, scores_of, top_units

__all__ = [
    "CRITERIA",
    "DRAW_MEASURES",
    "GENERATION_MEASURES",
    "DEFAULT_COMPLIANCE_OPENINGS",
    "DEFAULT_REFUSAL_OPENINGS",
    "AblationRow",
    "AblationTable",
    "ProbeResult",
    "ScanResult",
    "UnitSet",
    "ablate",
    "ablation_table",
    "build_report",
    "cheap_metrics",
    "degradation_scan",
    "draw_comparisons",
    "draw_name",
    "draw_sets",
    "plot_ablation",
    "plot_migration",
    "plot_probe",
    "plot_scan",
    "plot_unit_types",
    "probe_reasoning_direction",
    "random_units_like",
    "scores_of",
    "top_units",
    "units_dict",
]
