"""What a unit map looks like to a reader: the text summary of unit types per layer and the stacked-bar figure.

Apart from :mod:`.classification` so that the classification reads without the presentation (and without
matplotlib, imported only when a figure is drawn).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

from .._files import write_figure
from .codes import REPORT_ORDER

if TYPE_CHECKING:
    from .classification import UnitMap

#: Colours of the unit types in figures.
TYPE_COLORS = {"SCU": "#d62728", "UCU": "#1f77b4", "CU": "#bbbbbb", "RU": "#2ca02c"}


def summary_text(unit_map: UnitMap) -> str:
    """A text table of the number of units of each type per layer and block kind, with totals."""
    counts = unit_map.counts()
    layers = range(unit_map.num_layers)
    columns = [(kind, t) for kind in unit_map.kinds for t in REPORT_ORDER]
    header = ["layer", *(f"{kind}:{t}" for kind, t in columns)]
    rows = [[str(layer), *(str(counts[layer, kind][t]) for kind, t in columns)] for layer in layers]
    rows.append(["total", *(str(sum(counts[layer, kind][t] for layer in layers)) for kind, t in columns)])
    totals = {t: sum(c[t] for c in counts.values()) for t in REPORT_ORDER}
    num_units = sum(totals.values())
    overall = ", ".join(f"{t} {totals[t]} ({100 * totals[t] / num_units:.1f}%)" for t in REPORT_ORDER)
    settings = ", ".join(f"{k}={v}" for k, v in sorted(unit_map.settings.items()))  # as a saved map reads back
    return "\n".join(
        [
            f"Unit map of a {unit_map.fingerprint.get('model_type')} model ({settings})",
            text_table(header, rows),
            f"all {num_units} units: {overall}",
        ]
    )


def plot_unit_types(unit_map: UnitMap, path: Union[str, Path]) -> Path:
    """Write a PNG with, per block kind, the share of each unit type in every layer (stacked bars), atomically."""
    from matplotlib.figure import Figure

    counts, kinds, num_layers = unit_map.counts(), unit_map.kinds, unit_map.num_layers
    figure = Figure(figsize=(max(6.0, 0.35 * num_layers + 2), 3.2 * len(kinds)), layout="constrained")
    axes = figure.subplots(len(kinds), 1, squeeze=False)[:, 0]
    layers = list(range(num_layers))
    for ax, kind in zip(axes, kinds):
        bottom = [0.0] * num_layers
        for unit_type in ("SCU", "UCU", "RU", "CU"):
            shares = [100 * counts[layer, kind][unit_type] / unit_map.types[kind][layer].numel() for layer in layers]
            ax.bar(layers, shares, bottom=bottom, color=TYPE_COLORS[unit_type], label=unit_type)
            bottom = [b + s for b, s in zip(bottom, shares)]
        ax.set_title(f"{kind} units")
        ax.set_xlabel("layer")
        ax.set_ylabel("% of units")
        ax.set_ylim(0, 100)
    axes[0].legend(loc="upper right", ncols=4, fontsize="small")
    return write_figure(path, figure, dpi=120)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])
