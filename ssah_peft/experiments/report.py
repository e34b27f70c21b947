"""The demo's report: ``report.md`` (the table of every run, figures, unit counts, checks, settings) and
``results.json`` in the run directory.

A module of its own because the report is the demo's product and is read by people: its table row
(:func:`table_row`, also printed by ``benchmarks/demo_sweep.py``) and each section are small functions here, so a
change to one section is made in one place and the stages never format text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .._files import write_json, write_text
from ..evaluate import format_rate, wilson_interval
from ..unit_map import unit_widths
from .config import DemoConfig
from .frontier import FrontierPoint, plot_frontier
from .measures import RATES, rate_counts
from .methods import RANDOM_CONTROLS
from .stages import UnitsStage
from .timing import time_breakdown, time_table

TABLE_HEADER = (
    "| stage | method | data | ASR ↓ | over-refusal ↓ | task acc. ↑ | PPL ↓ | trainable params | stored size | "
    "train steps | train time |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
)

Results = Mapping[str, Any]


def stored_size(num_bytes: int) -> str:
    """``num_bytes`` in KiB or MiB; a dash for nothing stored."""
    if not num_bytes:
        return "–"
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 1024:.1f} KiB"


def rate_cell(result: Results, metric: str) -> str:
    """A rate with its 95% Wilson interval (:func:`~ssah_peft.evaluate.format_rate`), or the bare rate where the
    result holds no counts."""
    counts = rate_counts(result, metric)
    return format_rate(*counts) if counts else f"{result['metrics'][metric]:.3f}"


def rate_intervals(result: Results) -> dict[str, list[float]]:
    """``{metric: [low, high]}``: the 95% Wilson interval of each rate of a run (``results.json``)."""
    intervals = {}
    for metric, _, _ in RATES:
        counts = rate_counts(result, metric)
        if counts:
            intervals[metric] = list(wilson_interval(*counts))
    return intervals


def table_row(stage: str, data: str, result: Results) -> str:
    """One line of the results table; every rate with its 95% Wilson interval."""
    m = result["metrics"]
    cells = [
        stage,
        result["method"],
        data,
        rate_cell(result, "asr"),
        rate_cell(result, "overrefusal"),
        rate_cell(result, "task_accuracy"),
        f"{m['perplexity']:.2f}",
        f"{result['trainable_parameters']:,}",
        stored_size(result["stored_bytes"]),
        f"{result.get('steps', 0) or '–'}",
        f"{result['train_seconds']:.0f} s",
    ]
    return f"| {' | '.join(cells)} |"


def _introduction(config: DemoConfig, command: str) -> list[str]:
    """Title, command line, and what each column measures."""
    definitions = " ".join(
        [
            f"ASR: keyword attack success on {config.harmful_prompts} held-out harmful prompts; over-refusal on "
            f"{config.overrefusal_prompts} benign sensitive-looking prompts; task accuracy: exact match on "
            f"{config.task_prompts} task_test prompts; PPL: perplexity of {config.perplexity_texts} held-out utility "
            "answers. Every rate is shown with its 95% Wilson interval [low, high].",
            "A `_random` method is the control of the SSAH method above it: random units (seeded) with exactly the "
            "same number of units per layer and block kind, trained the same way.",
            f"Greedy decoding, {config.max_new_tokens} new tokens.",
            f"Stage 4 fine-tunes the stage-2 model aligned with `{config.aligned_method}`; protect runs train "
            f"{config.protect_epoch_factor}× the steps of the others (the paper doubles their epochs).",
            "Stored size: the adapter file, or the trainable weights (fp32) for full fine-tuning.",
            "Trainable parameters of protect mode count its raw A and B, the entries that the protection holds at "
            "zero included (as `print_trainable_parameters`).",
            "Every model is evaluated with the chat template's default system prompt"
            + (
                ", also after the identity-shifting attack (which trains with the persona's system prompt)."
                if "identity_shift" in config.attacks
                else "."
            ),
        ]
    )
    return [f"# SSAH demo: {config.model}", "", f"Command: `{command}`", "", definitions, ""]


def _results_table(baseline: Results, align: Mapping[str, Results], attack: Mapping[str, Results]) -> list[str]:
    rows = [table_row("1 baseline", "–", baseline)]
    rows += [table_row("2 align", "refusals + benign", result) for result in align.values()]
    rows += [table_row("4 attack", result["data"], result) for result in attack.values()]
    return [*TABLE_HEADER, *rows, ""]


def _figures() -> list[str]:
    return [
        "## Figures",
        "",
        "Unit types per layer of the base model (only RU classified: the alignment budget) and of the aligned "
        "model (SCU, UCU, CU, RU):",
        "",
        "![base model units](align/unitmap_base.png)",
        "",
        "![aligned model units](units/unitmap_aligned.png)",
        "",
    ]


def _units(config: DemoConfig, units: UnitsStage) -> list[str]:
    """The aligned model's unit counts and the SCU ablation check."""
    return [
        "## Units of the aligned model",
        "",
        *_block(units.unit_map.summary()),
        f"SCU ablation check (output-projection columns zeroed; the first {config.harmful_prompts} prompts of each "
        f"evaluation set, perplexity of the first {config.harmful_prompts} utility_calibration answers): "
        f"{units.scu_check()}.",
        "",
        units.ablation.markdown(),
        "",
        "![ablation](units/ablation.png)",
        "",
    ]


def _stability(units: UnitsStage) -> list[str]:
    """IoU of the SCU and RU between maps of the aligned model from other data or another scorer."""
    return [
        "## Stability of the unit sets",
        "",
        "Intersection over union of each unit set between two maps of the aligned model at the same proportions: "
        "scored on two disjoint halves of the calibration pairs (every other pair), and by another scorer on all of "
        "them. 1 means the same units; small values mean the set depends on the data or the scorer.",
        "",
        units.stability.markdown(),
        "",
    ]


def _probes(units: UnitsStage) -> list[str]:
    lines = [
        "## Refusal-direction probe",
        "",
        "Cosine distance of a harmful query's hidden state to a refusal and to a compliance continuation, per block "
        "(the paper's Sec. 3).",
        "",
    ]
    for name, probe in units.probes.items():
        lines += [f"- {name} model: {probe.verdict()}", "", f"![probe of the {name} model](units/probe_{name}.png)", ""]
    return lines


def _migrations(attack: Mapping[str, Results]) -> list[str]:
    """The unit types of the aligned model against those after each attack scored again (``migration_runs``)."""
    lines = [
        "## Attribute migration",
        "",
        "Unit types of the aligned model (rows) against those of the same model after an attack (columns), scored "
        "on the same calibration data with the same proportions (the paper's Fig. 5).",
        "",
    ]
    for key, result in attack.items():
        if "migration" in result:
            lines += [f"### {key}", "", *_block(result["migration"])]
            lines += [f"![migration after {key}](attack/{key}/migration.png)", ""]
    return lines


def frontier_points_of(attack: Mapping[str, Results], total_units: int) -> list[FrontierPoint]:
    """The demo's attack runs as points of a protection frontier (:mod:`.frontier`): task accuracy and ASR after
    the attack with their Wilson intervals, SSAH's protect runs and their random controls labelled with the share
    of units they froze."""
    controls = {method.name for method in RANDOM_CONTROLS.values()}
    points = []
    for result in attack.values():
        name = result["method"]
        frozen = sum(n for blocks in result.get("unit_counts", {}).values() for n in blocks.values())
        group = "random units" if name in controls else "SSAH protect" if frozen else name
        label = f"{frozen / total_units:.1%}" if frozen else ""
        intervals = rate_intervals(result)
        accuracy, asr = result["metrics"]["task_accuracy"], result["metrics"]["asr"]
        accuracy_range = tuple(intervals.get("task_accuracy", (accuracy, accuracy)))
        asr_range = tuple(intervals.get("asr", (asr, asr)))
        points.append(FrontierPoint(result["data"], group, label, accuracy, asr, accuracy_range, asr_range))
    return points


def _frontier() -> list[str]:
    return [
        "## Protection frontier",
        "",
        "ASR after each attack against task accuracy after it (95% Wilson intervals as bars), labelled with the "
        "share of units frozen: better is down and to the right. SSAH's units and random units of the same per-layer "
        "counts at each share; `benchmarks/frontier.py` sweeps more budgets, the rival scorers and seeds "
        "(`benchmarks/results/frontier/`).",
        "",
        "![protection frontier](attack/frontier.png)",
        "",
    ]


def _time(config: DemoConfig, results: DemoResults) -> list[str]:
    """Seconds per kind of work and stage (:func:`.timing.time_breakdown`)."""
    table, wall = results.time_breakdown(config)
    return [
        "## Where the time went",
        "",
        "Wall seconds of every step this run directory's demo computed (cached steps of a resumed run count once), by "
        "kind of work and stage; training, generation and perplexity from the runs' results, the rest from "
        "`timings.jsonl`. Model loads include the first conversion of the embedded model; other: imports, data "
        "sets, trainer set-up, adapter saves, judging.",
        "",
        time_table(table, wall),
        "",
    ]


def _settings(config: DemoConfig) -> list[str]:
    return ["## Settings", "", "```json", json.dumps(config.to_json(), indent=2), "```", ""]


def _block(text: str) -> list[str]:
    """``text`` as a fenced code block followed by a blank line."""
    return ["```", text, "```", ""]


@dataclass
class DemoResults:
    """What the stages found, as the report shows it (``results.json``: :meth:`to_json`)."""

    baseline: Results
    align: Mapping[str, Results]
    """Alignment runs by method name."""
    units: UnitsStage
    attack: Mapping[str, Results]
    """Attack runs by ``data/method``."""

    def runs(self) -> dict[str, Results]:
        """Every fine-tuning or evaluation run, keyed ``<stage>/<name>`` (the stage as the time table names it)."""
        return {
            "1 baseline/base": self.baseline,
            **{f"2 align/{name}": result for name, result in self.align.items()},
            **{f"4 attack/{key}": result for key, result in self.attack.items()},
        }

    def time_breakdown(self, config: DemoConfig) -> tuple[dict[str, dict[str, float]], float]:
        return time_breakdown(config, self.runs())

    def to_json(self, config: Optional[DemoConfig] = None) -> dict[str, Any]:
        units = self.units
        return {
            "baseline": self.baseline,
            "align": self.align,
            "attack": self.attack,
            "scu_check": units.scu_check(),
            "ablation": units.ablation.to_dict(),
            "probes": {name: probe.verdict() for name, probe in units.probes.items()},
            "stability": units.stability.to_dict(),
            "intervals": {
                "baseline": rate_intervals(self.baseline),
                "align": {name: rate_intervals(result) for name, result in self.align.items()},
                "attack": {key: rate_intervals(result) for key, result in self.attack.items()},
            },
            **({"time": self._time_json(config)} if config is not None else {}),
        }

    def _time_json(self, config: DemoConfig) -> dict[str, Any]:
        table, wall = self.time_breakdown(config)
        return {"wall_seconds": round(wall, 2), "seconds_by_stage_and_kind": table}


def demo_report(config: DemoConfig, results: DemoResults, command: str) -> str:
    """The text of ``report.md``."""
    sections = [
        _introduction(config, command),
        _results_table(results.baseline, results.align, results.attack),
        _figures(),
        _frontier(),
        _units(config, results.units),
        _stability(results.units),
        _probes(results.units),
        _migrations(results.attack),
        _time(config, results),
        _settings(config),
    ]
    return "\n".join(line for section in sections for line in section)


def write_demo_report(config: DemoConfig, results: DemoResults, command: str) -> Path:
    """Write ``report.md`` (table, figures, unit counts, command line) and ``results.json`` into the run dir;
    returns the path of ``report.md``."""
    total_units = sum(sum(widths) for widths in unit_widths(results.units.unit_map).values())
    plot_frontier(
        frontier_points_of(results.attack, total_units), config.run_dir / "attack" / "frontier.png", title="attack:"
    )
    path = config.run_dir / "report.md"
    write_text(path, demo_report(config, results, command))
    write_json(config.run_dir / "results.json", results.to_json(config))
    return path
