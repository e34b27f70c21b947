"""Experiments with the SSAH method: the demo (``make demo``) and the toolkit its runs and
``benchmarks/demo_sweep.py`` are built from, one concept per module:

* :mod:`.methods`: THE method table: each fine-tuning method (full, LoRA, SSAH select/protect with a unit
  selector) once, with its peft config, its units and its learning-rate key;
* :mod:`.config`: :class:`DemoConfig`, the settings of a run, and its presets;
* :mod:`.data`: the records trained and evaluated on, cut from the built-in sets;
* :mod:`.measures`: what every run measures: evaluation metrics and the unit map;
* :mod:`.finetuning`: one fine-tuning run with a method (:func:`train_method`, on the training layer
  :mod:`ssah_peft.training`);
* :mod:`.caching`: cached results and artifacts in a run directory, and its settings check;
* :mod:`.stages`: the demo's stages (baseline, align, units, attack with the migration of unit types);
* :mod:`.stability`: the IoU of the unit sets between calibration halves and scorers;
* :mod:`.timing`: where a demo run's time goes (``timings.jsonl``, the report's time table);
* :mod:`.choosers`: THE chooser table of the protection frontier: each chooser (its unit map, how it picks a
  budget of units, its random control) once; :mod:`.chooser_maps`: the unit maps they read, made and cached;
* :mod:`.frontier`: the protection frontier (``benchmarks/frontier.py``): runs by budget, chooser and setting;
  :mod:`.frontier_tables` their tables with pooled Wilson intervals and paired differences from random;
  :mod:`.frontier_figure` the figure;
* :mod:`.report`: the demo's ``report.md`` and ``results.json``;
* :mod:`.demo`: :func:`run_demo`, every stage in order.
"""

from .caching import cached_artifact, cached_result, check_run_dir
from .config import ATTACK_SETS, DemoConfig
from .data import alignment_records, attack_records, spread, utility_split
from .demo import run_demo
from .finetuning import merged_model, train_method
from .measures import evaluate_model, unit_map_of
from .methods import METHODS, RANDOM_CONTROLS, Method, UnitSelector, budget_selector, method_named, random_like
from .report import TABLE_HEADER, DemoResults, rate_cell, table_row, write_demo_report
from .stability import StabilityTable, stability_table
from .stages import ALIGN_METHODS, ATTACK_METHODS, UnitsStage

__all__ = [
    "ALIGN_METHODS",
    "ATTACK_METHODS",
    "ATTACK_SETS",
    "METHODS",
    "RANDOM_CONTROLS",
    "TABLE_HEADER",
    "DemoConfig",
    "DemoResults",
    "Method",
    "StabilityTable",
    "UnitSelector",
    "UnitsStage",
    "alignment_records",
    "attack_records",
    "budget_selector",
    "cached_artifact",
    "cached_result",
    "check_run_dir",
    "evaluate_model",
    "merged_model",
    "method_named",
    "random_like",
    "rate_cell",
    "run_demo",
    "spread",
    "stability_table",
    "table_row",
    "train_method",
    "unit_map_of",
    "utility_split",
    "write_demo_report",
]
