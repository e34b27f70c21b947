"""Figures of the analyses, each a PNG with a CSV of exactly the plotted numbers next to it (same stem).

The CSV makes every figure checkable and re-plottable without the run that produced it. Figures are drawn with
matplotlib's object API (``Figure``, no pyplot state), so they work headless and in threads.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .._files import write_figure, write_text
from ..unit_map import UNIT_TYPES, Migration, UnitMap
from .ablation import AblationTable
from .probe import ProbeResult
from .scan import ScanResult, beyond_tolerance

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PathLike = Union[str, Path]
#: Row/column order of migration matrices: the paper's order of the types.
TYPE_ORDER: tuple[str, ...] = ("SCU", "UCU", "CU", "RU")


def _write_csv(png: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(png.with_suffix(".csv"), text.getvalue())


def _figure(**kwargs: Any) -> Figure:
    """A new matplotlib figure; matplotlib is imported on first use, so importing the package stays fast."""
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _save(figure: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_figure(path, figure, dpi=120)


def plot_unit_types(unit_map: UnitMap, path: PathLike) -> Path:
    """Share of each unit type per layer and block kind (:meth:`UnitMap.plot`), plus the counts as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unit_map.plot(path)
    counts = unit_map.counts()
    _write_csv(
        path,
        ["layer", "kind", *UNIT_TYPES],
        [[layer, kind, *(c[t] for t in UNIT_TYPES)] for (layer, kind), c in sorted(counts.items())],
    )
    return path


def plot_migration(migration: Migration, path: PathLike, title: str = "unit type migration") -> Path:
    """The paper's Fig. 5 as a matrix: rows = type before, columns = type after, cells = count and % of units."""
    order = list(TYPE_ORDER)
    percent = migration.percent
    index = [UNIT_TYPES.index(t) for t in order]
    counts = migration.counts[index][:, index]
    shares = percent[index][:, index]
    figure = _figure(figsize=(5.2, 4.4))
    ax = figure.subplots()
    image = ax.imshow(shares.numpy(), cmap="Blues")
    for i in range(len(order)):
        for j in range(len(order)):
            dark = shares[i, j] > 0.6 * float(shares.max())
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}\n{float(shares[i, j]):.2f}%",
                ha="center",
                va="center",
                fontsize="small",
                color="white" if dark else "black",
            )
    ax.set_xticks(range(len(order)), order)
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel("after")
    ax.set_ylabel("before")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="% of all units")
    path = _save(figure, path)
    _write_csv(
        path,
        ["before", "after", "count", "percent"],
        [[a, b, int(counts[i, j]), float(shares[i, j])] for i, a in enumerate(order) for j, b in enumerate(order)],
    )
    return path


def plot_probe(result: ProbeResult, path: PathLike) -> Path:
    """Distance of Q to the refusal and compliance continuations: per block (at ``max_appended`` tokens) and per
    number of appended tokens (mean over blocks), with 95% confidence bands over prompts."""
    by_block, by_appended = result.block_means(), result.appended_means()
    blocks = list(range(result.num_blocks))
    appended = list(range(1, result.max_appended + 1))
    colors = {"refusal": "#2ca02c", "compliance": "#d62728"}
    figure = _figure(figsize=(10, 3.6))
    left, right = figure.subplots(1, 2)
    for ax, x, series in ((left, blocks, by_block), (right, appended, by_appended)):
        for name, (mean, ci) in series.items():
            ax.plot(x, mean.numpy(), marker="o", markersize=3, color=colors[name], label=f"Q + {name}")
            ax.fill_between(x, (mean - ci).numpy(), (mean + ci).numpy(), color=colors[name], alpha=0.2)
        ax.set_ylabel("cosine distance to Q")
        ax.legend(fontsize="small")
    left.set_xlabel("block")
    left.set_title(f"per block, {result.max_appended} appended tokens")
    right.set_xlabel("appended tokens")
    right.set_title("mean over blocks")
    figure.suptitle(result.verdict(), fontsize="medium")
    path = _save(figure, path)
    rows = [
        [
            "block",
            b,
            result.max_appended,
            *(float(v) for name in ("refusal", "compliance") for v in (by_block[name][0][b], by_block[name][1][b])),
            float(result.refusal_preference()[b]),
        ]
        for b in blocks
    ]
    rows += [
        [
            "appended",
            "mean",
            k,
            *(
                float(v)
                for name in ("refusal", "compliance")
                for v in (by_appended[name][0][k - 1], by_appended[name][1][k - 1])
            ),
            "",
        ]
        for k in appended
    ]
    _write_csv(
        path,
        [
            "series",
            "block",
            "appended",
            "refusal_mean",
            "refusal_ci95",
            "compliance_mean",
            "compliance_ci95",
            "fraction_preferring_refusal",
        ],
        rows,
    )
    return path


ABLATION_METRICS: tuple[tuple[str, str], ...] = (
    ("asr", "attack success rate"),
    ("overrefusal", "over-refusal rate"),
    ("accuracy", "task accuracy"),
    ("perplexity", "perplexity"),
)


def plot_ablation(table: AblationTable, path: PathLike) -> Path:
    """One bar panel per metric, one bar per ablated set (the intact model first)."""
    names = [row.name for row in table.rows]
    figure = _figure(figsize=(3.0 * len(ABLATION_METRICS), 3.4))
    for ax, (key, label) in zip(figure.subplots(1, len(ABLATION_METRICS)), ABLATION_METRICS):
        values = [getattr(row, key) for row in table.rows]
        bars = ax.bar(range(len(names)), values, color="#7f7f7f")
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
        ax.set_title(label)
        if key == "perplexity":
            ax.set_yscale("log")
    path = _save(figure, path)
    _write_csv(
        path,
        ["ablated", "num_units", "share", *(key for key, _ in ABLATION_METRICS)],
        [[r.name, r.num_units, r.share, *(getattr(r, key) for key, _ in ABLATION_METRICS)] for r in table.rows],
    )
    return path


def plot_scan(scans: Sequence[ScanResult], path: PathLike) -> Path:
    """Degradation-scan curves: one row per criterion, one panel per metric, from the intact model (fraction 0)
    to the step that stopped the scan.

    A watched metric gets its tolerance band (baseline ± allowed change) and red marks on the steps beyond it; the
    metrics a criterion does not watch are drawn grey, because how they move is what the group is for (pruning
    SCU keeps the NLL but should move the refusal rate). The dashed line is the chosen fraction. The x axis is
    linear up to the first scanned fraction and logarithmic above, since the default fractions span two decades.
    """
    if not scans:
        raise ValueError("No scan results to plot")
    names = list(dict.fromkeys(name for scan in scans for name in scan.baseline))
    figure = _figure(figsize=(3.8 * len(names), 2.9 * len(scans)))
    rows: list[list[Any]] = []
    for scan, axes in zip(scans, figure.subplots(len(scans), len(names), squeeze=False)):
        steps: list[tuple[float, dict[str, float], list[str]]] = [(0.0, scan.baseline, [])]
        steps += [
            (f, m, beyond_tolerance(m, scan.baseline, scan.tolerances)) for f, m in zip(scan.fractions, scan.metrics)
        ]
        for ax, name in zip(axes, names):
            if name not in scan.baseline:
                ax.set_visible(False)
                continue
            x, y = [f for f, _, _ in steps], [m[name] for _, m, _ in steps]
            allowed = scan.tolerances.get(name)
            if allowed is None:
                ax.plot(x, y, marker="o", markersize=3, color="#7f7f7f")
            else:
                base = scan.baseline[name]
                ax.axhspan(base - allowed, base + allowed, color="#2ca02c", alpha=0.15, label=f"±{allowed:g}")
                ax.plot(x, y, marker="o", markersize=3, color="#1f77b4")
                broken = [(f, m[name]) for f, m, beyond in steps if name in beyond]
                if broken:
                    ax.scatter(*zip(*broken), color="#d62728", zorder=3, label="beyond tolerance")
            ax.axvline(
                scan.chosen_fraction,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"chosen {scan.chosen_fraction:g}",
            )
            ax.set_xscale("symlog", linthresh=scan.fractions[0])
            ax.set_xticks(x, [f"{f:g}" for f in x], rotation=90, fontsize="x-small")
            ax.set_xlim(-0.2 * scan.fractions[0], 1.2 * x[-1])
            ax.set_xlabel("pruned fraction of all units")
            ax.set_title(
                f"{scan.criterion}: {name}" + ("" if allowed is not None else " (not watched)"), fontsize="medium"
            )
            ax.legend(fontsize="x-small")
        rows += [
            [
                scan.criterion,
                f,
                *(m.get(name, "") for name in names),
                *(scan.tolerances.get(name, "") for name in names),
                ";".join(beyond),
                f == scan.chosen_fraction,
            ]
            for f, m, beyond in steps
        ]
    path = _save(figure, path)
    _write_csv(
        path,
        ["criterion", "fraction", *names, *(f"{name}_tolerance" for name in names), "beyond_tolerance", "chosen"],
        rows,
    )
    return path
