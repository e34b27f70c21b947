"""One Markdown report from the analysis files found in a run directory.

Run-directory convention (every file optional; the ``ssah-peft probe|ablate|scan`` commands write them):

* ``probe.json``: a :class:`ProbeResult` (``ssah-peft probe --out-dir RUN_DIR``);
* ``ablation.json``: an :class:`AblationTable` (``ssah-peft ablate --out-dir RUN_DIR``);
* ``scan_<criterion>.json``: a :class:`ScanResult` per criterion (``ssah-peft scan --out-dir RUN_DIR``); all of
  them share one scan-curve figure;
* ``unitmap*.safetensors``: unit maps; each gets a unit-types-per-layer figure;
* ``unitmap_before.safetensors`` and ``unitmap_after.safetensors``: also the migration matrix between them.

``ssah-peft report RUN_DIR`` draws the figures into ``RUN_DIR/figures/`` (PNG + CSV) and writes
``RUN_DIR/report.md`` with the figures, tables and verdicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .._files import write_text
from ..unit_map import UnitMap
from .ablation import AblationTable
from .figures import plot_ablation, plot_migration, plot_probe, plot_scan, plot_unit_types
from .probe import ProbeResult
from .scan import ScanResult


def _image(path: Path, run_dir: Path, caption: str) -> str:
    relative = path.relative_to(run_dir).as_posix()
    return f"![{caption}]({relative})\n\n[data]({Path(relative).with_suffix('.csv').as_posix()})"


def build_report(run_dir: Union[str, Path]) -> Path:
    """Write ``figures/`` and ``report.md`` for the files of ``run_dir`` (module docstring); returns the report."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} does not exist")
    figures = run_dir / "figures"
    sections = [f"# Analysis report: {run_dir.name}"]
    probe_file = run_dir / "probe.json"
    if probe_file.is_file():
        probe = ProbeResult.load(probe_file)
        png = plot_probe(probe, figures / "probe.png")
        sections.append(
            f"## Reasoning-direction probe\n\nThe model {probe.verdict()}.\n\n"
            + _image(png, run_dir, "probe distances")
        )
    ablation_file = run_dir / "ablation.json"
    if ablation_file.is_file():
        table = AblationTable.load(ablation_file)
        png = plot_ablation(table, figures / "ablation.png")
        sections.append(f"## Unit ablation\n\n{table.markdown()}\n\n" + _image(png, run_dir, "ablation"))
    scans = [ScanResult.load(scan_file) for scan_file in sorted(run_dir.glob("scan_*.json"))]
    if scans:
        png = plot_scan(scans, figures / "scan.png")
        sections.append("## Degradation scan curves\n\n" + _image(png, run_dir, "degradation scan"))
    for scan in scans:
        lines = [
            "| fraction | " + " | ".join(scan.baseline) + " |",
            "|---:|" + "---:|" * len(scan.baseline),
            "| 0 (intact) | " + " | ".join(f"{v:.3f}" for v in scan.baseline.values()) + " |",
        ]
        lines += [
            f"| {f} | " + " | ".join(f"{m[k]:.3f}" for k in scan.baseline) + " |"
            for f, m in zip(scan.fractions, scan.metrics)
        ]
        sections.append(
            f"## Degradation scan: {scan.criterion}\n\nChosen fraction {scan.chosen_fraction} "
            f"(tolerances {scan.tolerances}).\n\n" + "\n".join(lines)
        )
    maps = {path.stem: path for path in sorted(run_dir.glob("unitmap*.safetensors"))}
    for stem, path in maps.items():
        unit_map = UnitMap.load(path)
        png = plot_unit_types(unit_map, figures / f"{stem}.png")
        sections.append(
            f"## Unit map `{path.name}`\n\n```\n{unit_map.summary()}\n```\n\n"
            + _image(png, run_dir, f"unit types of {stem}")
        )
    if {"unitmap_before", "unitmap_after"} <= set(maps):
        migration = UnitMap.load(maps["unitmap_before"]).migration(UnitMap.load(maps["unitmap_after"]))
        png = plot_migration(migration, figures / "migration.png")
        sections.append(
            f"## Unit type migration (before → after)\n\n```\n{migration.table()}\n```\n\n"
            + _image(png, run_dir, "migration")
        )
    if len(sections) == 1:
        raise FileNotFoundError(f"{run_dir} holds none of probe.json, ablation.json, scan_*.json, unitmap*.safetensors")
    report = run_dir / "report.md"
    return write_text(report, "\n\n".join(sections) + "\n")
