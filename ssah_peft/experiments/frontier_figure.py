"""The frontier's figure: ASR after the attack against task accuracy after it, one panel per attack, one curve per
chooser and setting over its budgets (``frontier.png`` of ``benchmarks/frontier.py``, and the demo report's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluate import mean_sd
from .frontier_tables import grouped


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
