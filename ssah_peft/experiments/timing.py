"""Where a demo run's time goes: the wall seconds of every step it computed, by stage and kind of work.

A module of its own because the demo has a time budget (about 30 minutes on 2 CPU cores) and the only way to keep
it is to know what each part costs. Every step the stages compute (a model load, a scoring pass, a fine-tuning
run, an ablation table, a probe) appends one line to ``timings.jsonl`` in the run directory; the evaluation blocks
of each ``result.json`` already hold the seconds of generation and perplexity. :func:`time_breakdown` joins both
into the report's table. Steps a resumed run found cached cost nothing and are not counted again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import DemoConfig

#: Kinds of work, in the order of the report's table. Training, generation and perplexity come from the runs'
#: results; the others from ``timings.jsonl``.
KINDS: tuple[str, ...] = (
    "model loads",
    "training",
    "generation",
    "generation: ASR",
    "generation: over-refusal",
    "generation: task",
    "judging",
    "perplexity",
    "scoring passes",
    "SCU ablation",
    "refusal probes",
    "saving and figures",
)


def timings_path(config: DemoConfig) -> Path:
    return config.run_dir / "timings.jsonl"


@contextmanager
def timed(config: DemoConfig, stage: str, kind: str, what: str) -> Iterator[None]:
    """Append ``{"stage", "kind", "what", "seconds"}`` of the enclosed step to ``timings.jsonl`` when it ends."""
    start = time.perf_counter()
    yield
    record = {"stage": stage, "kind": kind, "what": what, "seconds": round(time.perf_counter() - start, 2)}
    path = timings_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def read_timings(config: DemoConfig) -> list[dict[str, Any]]:
    path = timings_path(config)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _evaluation_seconds(result: Mapping[str, Any]) -> dict[str, float]:
    """Seconds of each part of a run's evaluation (``evaluate_model``'s blocks). A result with
    ``generation_seconds`` generated every prompt in one call, and its blocks' seconds are judging only; an older
    one generated (and judged) each set on its own."""
    safety, utility = result.get("safety", {}), result.get("utility", {})
    parts = {
        "generation: ASR": safety.get("harmful", {}).get("seconds", 0.0),
        "generation: over-refusal": safety.get("overrefusal", {}).get("seconds", 0.0),
        "generation: task": utility.get("task", {}).get("seconds", 0.0),
    }
    seconds = {"perplexity": sum(block.get("seconds", 0.0) for block in utility.get("perplexity", {}).values())}
    if "generation_seconds" in result:
        return {"generation": result["generation_seconds"], "judging": sum(parts.values()), **seconds}
    return {**parts, **seconds}


def time_breakdown(
    config: DemoConfig, runs: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, dict[str, float]], float]:
    """``({stage: {kind: seconds}}, wall seconds of all demo processes)`` of a run directory.

    ``runs`` maps ``"<stage>/<name>"`` to each run's result (baseline, alignment and attack runs): their training
    and evaluation seconds. Everything else is read from ``timings.jsonl``; its ``process`` lines are the wall time
    of each ``run_demo`` call, and what no step accounts for is the stage ``"–"``, kind ``"other"`` (imports,
    building data sets, judging).
    """
    table: dict[str, dict[str, float]] = {}

    def add(stage: str, kind: str, seconds: float) -> None:
        table.setdefault(stage, {}).setdefault(kind, 0.0)
        table[stage][kind] += float(seconds)

    for key, result in runs.items():
        stage = key.split("/", 1)[0]
        add(stage, "training", result.get("train_seconds", 0.0))
        for kind, seconds in _evaluation_seconds(result).items():
            add(stage, kind, seconds)
    wall = 0.0
    for record in read_timings(config):
        if record["kind"] == "process":
            wall += record["seconds"]
        else:
            add(record["stage"], record["kind"], record["seconds"])
    accounted = sum(sum(kinds.values()) for kinds in table.values())
    if wall:
        add("–", "other", max(wall - accounted, 0.0))
    return table, wall


def time_table(table: Mapping[str, Mapping[str, float]], wall: float) -> str:
    """The breakdown as Markdown: one row per kind of work, one column per stage, totals."""
    stages = sorted(table)  # "1 baseline" ... "4 attack", then "–"
    kinds = [k for k in (*KINDS, "other") if any(k in table[s] for s in stages)]
    lines = [
        f"| work | {' | '.join(stages)} | total |",
        f"|---|{'---:|' * (len(stages) + 1)}",
    ]
    for kind in kinds:
        cells = [f"{table[s][kind]:.0f}" if kind in table[s] else "" for s in stages]
        lines.append(f"| {kind} | {' | '.join(cells)} | {sum(table[s].get(kind, 0.0) for s in stages):.0f} |")
    totals = [f"{sum(table[s].values()):.0f}" for s in stages]
    lines.append(f"| **all** | {' | '.join(totals)} | {sum(sum(t.values()) for t in table.values()):.0f} |")
    note = f"Wall time of the demo process(es): {wall:.0f} s ({wall / 60:.1f} min)." if wall else ""
    return "\n".join(lines) + ("\n\n" + note if note else "")
