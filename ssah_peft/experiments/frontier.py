"""The protection frontier (issue 17): ASR after a fine-tuning attack against task accuracy after it, for budgets of
frozen units chosen by each scorer and at random, with full fine-tuning, LoRA and dense training of every unit as
reference points.

A module of its own because the frontier is the project's answer to "do the chosen units matter?": at the same
task accuracy, does freezing SSAH's units keep more refusals than freezing as many other units? One point is one
attack run (:func:`.stages.attack_result`, exactly as the demo's stage 4) of a :class:`FrontierRun`; a chooser picks
a budget of units from its scorer's map (:func:`.methods.budget_selector`), the random chooser draws units with
exactly the per-layer and per-kind counts of SSAH's choice at that budget (:func:`.methods.random_like`, one draw per
seed). Two settings freeze them:

* ``protect``: SSAH protect mode, a LoRA-like update of every linear layer with the units' slices held at zero
  (what the library offers as "LoRA that cannot touch the safety units");
* ``dense``: select mode on every other unit, i.e. dense fine-tuning of all output-projection units but the frozen
  ones: the paper's own setting (it froze units inside full fine-tuning, Sec. 5.2).

``benchmarks/frontier.py`` runs the sweep; the demo's report draws its own attack runs with :func:`plot_frontier`.
Rates are pooled over seeds for Wilson intervals and averaged per seed for mean ± sd; a chooser is compared with
random by the paired difference over seeds (same seed: same training data order and adapter init).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..analysis.scan import reclassified
from ..evaluate import format_rate, mean_sd, wilson_interval
from ..unit_map import UnitMap
from .config import ATTACK_SETS
from .measures import rate_counts
from .methods import (
    FULL,
    LORA,
    Method,
    UnitSelector,
    budget_selector,
    complement_of,
    random_like,
    select_config,
    ssah_protect,
)

#: Shares of all units frozen: about the SCU alone, SCU + top CU (the paper's 6%), 20%, 40%, SCU + all CU.
BUDGETS: tuple[float, ...] = (0.013, 0.075, 0.2, 0.4, 0.72)
#: Who chooses the units: SSAH's types (SCU, then CU by I_S − I_U), the rival scorers' safety attribution (Wanda or
#: SNIP score difference, Wei et al. 2024) and random units with SSAH's per-layer counts.
CHOOSERS: tuple[str, ...] = ("ssah", "wanda", "snip", "random")
#: Controls for the rival scorers, outside the default sweep: random units with THEIR per-layer counts (a rival's
#: global ranking puts its budget in other layers than SSAH's); :func:`paired_differences` pairs ``wanda`` with
#: ``random_wanda`` where that exists.
RIVAL_CONTROLS: tuple[str, ...] = ("random_wanda", "random_snip")
#: How the chosen units are frozen (module docstring).
SETTINGS: tuple[str, ...] = ("protect", "dense")
#: Attempts at a better SSAH choice, outside the default sweep, each with random units of its own per-layer counts:
#: ``ssah_std`` ranks I_S and I_U z-scored within each layer and block kind (FLAP's standardisation: layers with
#: large activations no longer take most of a global budget); ``ssah_attn`` and ``ssah_mlp`` take the whole budget
#: (a share of all units) from attention channels only or from MLP neurons only, in SSAH's order; ``ssah_prompt``
#: chooses as ``ssah`` from a map scored on the prompt tokens instead of the responses (where the model reads the
#: request it must decide to refuse, before any refusal is written).
VARIANTS: tuple[str, ...] = (
    "ssah_std",
    "random_ssah_std",
    "ssah_attn",
    "random_ssah_attn",
    "ssah_mlp",
    "random_ssah_mlp",
    "ssah_prompt",
    "random_ssah_prompt",
)
#: The block kinds a variant chooses from (the others choose from all).
VARIANT_KINDS: dict[str, tuple[str, ...]] = {"ssah_attn": ("attn",), "ssah_mlp": ("mlp",)}
#: The scorer whose map each chooser reads (``variance_std``: the variance map reclassified, :func:`standardized`).
#: A ``random_<chooser>`` control reads its chooser's map, whose per-layer counts it copies; ``random`` copies SSAH's.
CHOOSER_SCORERS: dict[str, str] = {
    "ssah": "variance",
    "wanda": "wanda",
    "snip": "snip",
    "random": "variance",
    "ssah_std": "variance_std",
    "ssah_attn": "variance",
    "ssah_mlp": "variance",
    "ssah_prompt": "variance_prompt",
}
CHOOSER_SCORERS.update(
    {c: CHOOSER_SCORERS[c.removeprefix("random_")] for c in RIVAL_CONTROLS + VARIANTS if c.startswith("random_")}
)
#: How the maps of :data:`CHOOSER_SCORERS` are scored, where that is not the scorer's own name on the responses
#: (``variance_std`` is reclassified from the variance map, :func:`standardized`): (scoring method, tokens).
SCORING_OF: dict[str, tuple[str, str]] = {"variance_prompt": ("variance", "prompt")}


def standardized(unit_map: UnitMap) -> UnitMap:
    """``unit_map`` classified again from its own scores with I_S and I_U z-scored per layer and block kind."""
    return reclassified(unit_map, standardize=True)


def protection_selector(chooser: str, budget: float, seed: int) -> UnitSelector:
    """The units ``chooser`` freezes at ``budget`` (a share of all units, global ranking as in the paper)."""
    if chooser not in CHOOSER_SCORERS:
        raise ValueError(f"Unknown chooser {chooser!r}; known: {', '.join(CHOOSER_SCORERS)}")
    controlled = chooser.removeprefix("random_") if chooser in RIVAL_CONTROLS + VARIANTS else chooser
    if controlled in ("wanda", "snip"):
        chosen = budget_selector(budget, "protect", rule="difference", scorer=controlled)
    else:
        chosen = budget_selector(budget, "protect", rule="types", kinds=VARIANT_KINDS.get(controlled))
    return random_like(chosen, seed) if chooser.startswith("random") else chosen


@dataclass(frozen=True)
class FrontierRun:
    """One point of the frontier: an attack run with ``budget`` of the units chosen by ``chooser`` frozen in
    ``setting``, or a reference (``setting == "reference"``, ``budget`` 0: :data:`REFERENCES`)."""

    attack: str
    setting: str
    chooser: str
    budget: float
    seed: int

    @property
    def name(self) -> str:
        """The run's directory name and its ``method`` in results, e.g. ``protect-ssah-7.5``."""
        if self.setting == "reference":
            return self.chooser
        return f"{self.setting}-{self.chooser}-{self.budget * 100:g}"

    def run_dir(self, root: Path) -> Path:
        return root / self.attack / f"seed{self.seed}" / self.name

    def method(self) -> Method:
        """The method this run trains with; a ``dense`` run takes full fine-tuning's learning rate."""
        if self.setting == "reference":
            return REFERENCES[self.chooser]
        frozen = protection_selector(self.chooser, self.budget, self.seed)
        if self.setting == "protect":
            return ssah_protect(self.name, frozen)
        if self.setting == "dense":
            return dense_training(self.name, frozen)
        raise ValueError(f"Unknown setting {self.setting!r}; known: {', '.join(SETTINGS)}, reference")

    @property
    def scorer(self) -> Optional[str]:
        """The scorer of the unit map the run chooses from; None for a reference without units."""
        if self.setting == "reference":
            return None if REFERENCES[self.chooser].units is None else "variance"
        return CHOOSER_SCORERS[self.chooser]


def dense_training(name: str, frozen: UnitSelector) -> Method:
    """Select mode on every unit but ``frozen``'s, at full fine-tuning's learning rate: dense fine-tuning of the
    output-projection units (embeddings, norms and the output head stay as they are) with ``frozen`` held."""
    return Method(name, select_config, FULL.learning_rate_key, units=complement_of(frozen))


#: The reference points: full fine-tuning, LoRA, and dense training with nothing frozen (the ``dense`` setting at
#: budget 0, which unlike full fine-tuning leaves embeddings, norms and the output head as they are).
REFERENCES: dict[str, Method] = {
    "full": FULL,
    "lora": LORA,
    "dense": dense_training("dense", UnitSelector("no units", lambda unit_map: {})),
}


def frontier_runs(
    budgets: Sequence[float] = BUDGETS,
    choosers: Sequence[str] = CHOOSERS,
    settings: Sequence[str] = SETTINGS,
    attacks: Sequence[str] = ATTACK_SETS,
    seeds: Sequence[int] = (0, 1, 2),
) -> list[FrontierRun]:
    """Every run of a sweep, seed by seed (an interrupted sweep has whole seeds first): per attack the references,
    then every setting, budget and chooser. ``dense`` runs only SSAH and random (a rival scorer's dense runs would
    double the sweep's time)."""
    runs = []
    for seed in seeds:
        for attack in attacks:
            runs += [FrontierRun(attack, "reference", name, 0.0, seed) for name in REFERENCES]
            for setting in settings:
                for budget in budgets:
                    for chooser in choosers:
                        if setting == "dense" and chooser not in ("ssah", "random"):
                            continue
                        runs.append(FrontierRun(attack, setting, chooser, budget, seed))
    return runs


def check_runs(runs: Iterable[FrontierRun], maps: Mapping[str, UnitMap]) -> None:
    """Choose every run's units from its scorer's map in ``maps`` now: a budget a chooser cannot meet (more
    attention units than the model has, say) is a ``ValueError`` naming the run before any run trains, not after
    hours of the others."""
    for run in runs:
        try:
            run.method().units_of(maps.get(run.scorer) if run.scorer else None)
        except ValueError as error:
            raise ValueError(f"{run.name} ({run.attack}, seed {run.seed}): {error}") from None


# ----------------------------------------------------------------------------------------------------
# Results: one row per run, summaries over seeds
# ----------------------------------------------------------------------------------------------------

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
    """``rows`` as CSV (one line per run, the columns of :func:`frontier_row`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True)
class FrontierPoint:
    """A point of a frontier figure: task accuracy (x) and ASR (y) with their error bars as (low, high)."""

    panel: str
    group: str
    label: str
    accuracy: float
    asr: float
    accuracy_range: tuple[float, float]
    asr_range: tuple[float, float]


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


def frontier_points(rows: Iterable[Mapping[str, Any]]) -> list[FrontierPoint]:
    """One point per (attack, setting, chooser, budget): the mean over seeds with ± sd bars (one seed: its Wilson
    intervals)."""
    points = []
    for (attack, setting, chooser, budget), group in grouped(rows).items():
        values = {}
        for prefix in ("asr", "task"):
            series = [float(r[prefix]) for r in group]
            mean, sd = mean_sd(series)
            spread = (
                (mean - sd, mean + sd) if len(group) > 1 else (group[0][f"{prefix}_low"], group[0][f"{prefix}_high"])
            )
            values[prefix] = (mean, spread)
        name = chooser if setting == "reference" else f"{setting}: {chooser}"
        label = "" if setting == "reference" else f"{budget * 100:g}%"
        points.append(
            FrontierPoint(attack, name, label, values["task"][0], values["asr"][0], values["task"][1], values["asr"][1])
        )
    return points


def paired_differences(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each chooser against its random control at the same attack, setting and budget (``random_<chooser>``, with
    the chooser's own per-layer counts, where it exists; else ``random``, with SSAH's): the per-seed differences of
    ASR and task accuracy over the seeds both have, as mean ± sd, and how many seeds had a lower ASR."""
    groups = grouped(rows)
    comparisons = []
    for (attack, setting, chooser, budget), group in groups.items():
        if setting == "reference" or chooser.startswith("random"):
            continue
        control = f"random_{chooser}" if (attack, setting, f"random_{chooser}", budget) in groups else "random"
        reference = groups.get((attack, setting, control, budget))
        if not reference:
            continue
        by_seed = {r["seed"]: r for r in reference}
        pairs = [(r, by_seed[r["seed"]]) for r in group if r["seed"] in by_seed]
        if not pairs:
            continue
        asr = [float(a["asr"]) - float(b["asr"]) for a, b in pairs]
        task = [float(a["task"]) - float(b["task"]) for a, b in pairs]
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


# ----------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------


def plot_frontier(points: Sequence[FrontierPoint], path: Path, title: str = "") -> Path:
    """ASR after the attack (y) against task accuracy after it (x), one panel per attack, one colour and marker per
    group joined in the order given (budget order: the group's frontier), each point labelled (its budget); error
    bars as the points give them. Better is down and to the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys(p.panel for p in points))
    groups = list(dict.fromkeys(p.group for p in points))
    figure = Figure(figsize=(6.5 * len(panels), 5.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    palette = [f"C{i}" for i in range(10)] + ["black", "darkgoldenrod", "magenta", "teal"]
    colours = {group: palette[i % len(palette)] for i, group in enumerate(groups)}
    markers = {group: "os^Dv<>ph*XPd"[i % 13] for i, group in enumerate(groups)}
    for ax, panel in zip(axes, panels):
        for group in groups:
            members = [p for p in points if p.panel == panel and p.group == group]
            if not members:
                continue
            xs, ys = [p.accuracy for p in members], [p.asr for p in members]
            xerr = [
                [x - p.accuracy_range[0] for x, p in zip(xs, members)],
                [p.accuracy_range[1] - x for x, p in zip(xs, members)],
            ]
            yerr = [
                [y - p.asr_range[0] for y, p in zip(ys, members)],
                [p.asr_range[1] - y for y, p in zip(ys, members)],
            ]
            if len(members) > 1:  # a group's points in budget order: its frontier
                ax.plot(xs, ys, color=colours[group], alpha=0.35, linewidth=1)
            ax.errorbar(
                xs,
                ys,
                xerr=xerr,
                yerr=yerr,
                fmt=markers[group],
                color=colours[group],
                alpha=0.8,
                capsize=2,
                elinewidth=0.8,
                label=group,
            )
            for p in members:
                if p.label:
                    ax.annotate(p.label, (p.accuracy, p.asr), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_title(f"{title} {panel}".strip())
        ax.set_xlabel("task accuracy after the attack")
        ax.set_ylabel("ASR after the attack")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
