"""The frontier's tables: one CSV row per run, and the summaries over seeds (mean ± sd, pooled Wilson intervals,
paired differences from each chooser's random control), for ``benchmarks/frontier.py``'s ``results.csv`` and
``summary.md``.

A module of its own because what a sweep runs (:mod:`.frontier`) and how its results are summarised change for
different reasons: a new chooser is one entry of :mod:`.choosers` and needs no new table code.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

from ..evaluate import format_rate, mean_sd, wilson_interval
from .choosers import chooser_named
from .measures import rate_counts

if TYPE_CHECKING:
    from .frontier import FrontierRun


#: The rates of a row: (metric of the result, column prefix).
RATE_COLUMNS: tuple[tuple[str, str], ...] = (("asr", "asr"), ("task_accuracy", "task"), ("overrefusal", "overrefusal"))


def frontier_row(run: FrontierRun, result: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: the run's identity, each rate with its hits, n and 95% Wilson interval, perplexity and costs."""
    row: dict[str, Any] = {
        "attack": run.attack,
        "setting": run.setting,
        "chooser": run.chooser,
        "budget": run.budget,
        "seed": run.seed,
        **({} if run.draw is None else {"draw": run.draw}),
    }
    for metric, prefix in RATE_COLUMNS:
        hits, n = rate_counts(result, metric) or (None, None)
        low, high = wilson_interval(hits, n) if n else (None, None)
        row.update({prefix: result["metrics"][metric], f"{prefix}_hits": hits, f"{prefix}_n": n})
        row.update({f"{prefix}_low": low, f"{prefix}_high": high})
    row["perplexity"] = result["metrics"]["perplexity"]
    row["trainable_parameters"] = result["trainable_parameters"]
    row["train_seconds"] = result["train_seconds"]
    row["eval_seconds"] = result.get("eval_seconds", 0.0)
    return row


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """``rows`` as CSV (one line per run, the columns of :func:`frontier_row`; ``draw`` only where a run has one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


def _key(row: Mapping[str, Any]) -> tuple[str, str, str, float]:
    return row["attack"], row["setting"], row["chooser"], row["budget"]


def grouped(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, float], list[Mapping[str, Any]]]:
    """Rows by (attack, setting, chooser, budget), each group's seeds in order."""
    groups: dict[tuple[str, str, str, float], list[Mapping[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        groups.setdefault(_key(row), []).append(row)
    return groups


def pooled(rows: Sequence[Mapping[str, Any]], prefix: str) -> tuple[int, int]:
    """(hits, n) of a rate summed over seeds."""
    return sum(int(r[f"{prefix}_hits"]) for r in rows), sum(int(r[f"{prefix}_n"]) for r in rows)


def _mean_sd_cell(mean_and_sd: tuple[float, float], seeds: int, sign: str = "") -> str:
    """``mean ± sd``; the bare mean for one seed, whose sd is not defined. ``sign="+"`` for differences."""
    mean, sd = mean_and_sd
    return f"{mean:{sign}.3f} ± {sd:.3f}" if seeds > 1 else f"{mean:{sign}.3f}"


def paired_differences(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each chooser against its random control at the same attack, setting and budget (its own control, with its
    per-layer counts, where that ran; else ``random``, with SSAH's): the per-seed differences of ASR and task
    accuracy over the seeds both have, as mean ± sd, and how many seeds had a lower ASR. A control with several
    independent draws at a seed counts as the mean of its draws there."""
    groups = grouped(rows)
    comparisons = []
    for (attack, setting, chooser, budget), group in groups.items():
        if setting == "reference" or chooser_named(chooser)[1]:
            continue
        entry = chooser_named(chooser)[0]
        control = entry.control if (attack, setting, entry.control, budget) in groups else "random"
        reference = groups.get((attack, setting, control, budget))
        if not reference:
            continue
        by_seed: dict[int, list[Mapping[str, Any]]] = {}
        for row in reference:
            by_seed.setdefault(row["seed"], []).append(row)
        pairs = [(r, by_seed[r["seed"]]) for r in group if r["seed"] in by_seed]
        if not pairs:
            continue
        asr, task = (
            [float(a[key]) - fmean(float(b[key]) for b in draws) for a, draws in pairs] for key in ("asr", "task")
        )
        comparisons.append(
            {
                "attack": attack,
                "setting": setting,
                "chooser": chooser,
                "control": control,
                "budget": budget,
                "seeds": len(pairs),
                "asr_difference": mean_sd(asr),
                "task_difference": mean_sd(task),
                "seeds_lower_asr": sum(d < 0 for d in asr),
            }
        )
    return comparisons


def frontier_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sweep's tables: every point (mean ± sd over seeds, pooled Wilson intervals) and the paired comparison of
    each chooser with random."""
    lines = [
        "| attack | setting | chooser | frozen | seeds | ASR mean ± sd | ASR pooled [95% Wilson] | "
        "task acc. mean ± sd | task acc. pooled | over-refusal pooled | PPL |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (attack, setting, chooser, budget), group in grouped(rows).items():
        frozen = "–" if setting == "reference" else f"{budget:.1%}"
        cells = [attack, setting, chooser, frozen, str(len(group))]
        for prefix in ("asr", "task"):
            spread = _mean_sd_cell(mean_sd([float(r[prefix]) for r in group]), len(group))
            cells += [spread, format_rate(*pooled(group, prefix))]
        cells += [format_rate(*pooled(group, "overrefusal"))]
        cells += [f"{mean_sd([float(r['perplexity']) for r in group])[0]:.2f}"]
        lines.append(f"| {' | '.join(cells)} |")
    lines += [
        "",
        "Paired with a random control (same attack, setting, budget and seed; `random` has SSAH's per-layer counts, "
        "`random_<scorer>` the scorer's; a negative ASR difference: fewer attacks succeed than with random units):",
        "",
        "| attack | setting | chooser | control | frozen | seeds | ΔASR mean ± sd | seeds with lower ASR | "
        "Δ task acc. mean ± sd |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in paired_differences(rows):
        asr, task = (_mean_sd_cell(c[key], c["seeds"], "+") for key in ("asr_difference", "task_difference"))
        lines.append(
            f"| {c['attack']} | {c['setting']} | {c['chooser']} | {c['control']} | {c['budget']:.1%} | "
            f"{c['seeds']} | {asr} | {c['seeds_lower_asr']} of {c['seeds']} | {task} |"
        )
    return lines
