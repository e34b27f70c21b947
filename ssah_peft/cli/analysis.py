"""``ssah-peft probe``, ``ssah-peft ablate`` and ``ssah-peft scan``: the analyses on a model from the command line.

Each writes its result file into ``--out-dir`` under the run-directory names of :mod:`ssah_peft.analysis.report`, so
that ``ssah-peft report RUN_DIR`` can assemble them; ``ssah-peft report`` is here too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from ..analysis import report as analysis_report
from ..analysis.ablation import AblationTable, ablation_table
from ..analysis.figures import plot_ablation, plot_probe, plot_scan
from ..analysis.probe import ProbeResult, probe_reasoning_direction
from ..analysis.report import build_report
from ..analysis.scan import (
    CRITERIA,
    DEFAULT_FRACTIONS,
    ScanResult,
    cheap_metrics,
    degradation_scan,
    reclassified,
    scores_of,
)
from ..evaluate import GenerationSettings
from ..models import EMBEDDED_MODELS
from ..unit_map import UnitMap
from .errors import CLIError, user_errors
from .inputs import load_unit_map, read_prompts
from .model_options import add_model_arguments, check_model_source, load_model
from .options import (
    RawDescriptionHelpFormatter,
    add_command,
    add_overwrite_argument,
    add_progress_argument,
    positive_fraction,
    positive_int,
)
from .paths import (
    ABLATION_TABLE,
    ANALYSIS_REPORT,
    EVAL_REPORT_PART,
    FIGURE_DATA,
    PNG,
    PROBE_RESULT,
    SCAN_RESULT,
    UNIT_MAP,
    check_output_dir,
    check_output_file,
)


def _analysis_parser(
    subparsers: Any, name: str, description: str, *, unit_map: Optional[str] = None, system_prompt: bool = False
) -> argparse.ArgumentParser:
    """The subparser of an analysis with the options they all have: the model to load, the run directory, progress
    bars, ``--overwrite`` and, given its help, ``--unit-map``."""
    parser = add_command(subparsers, name, description)
    add_model_arguments(parser, system_prompt=system_prompt)
    parser.add_argument("--out-dir", type=Path, required=True, help="run directory for the result files")
    if unit_map is not None:
        parser.add_argument("--unit-map", required=True, help=unit_map)
        parser.add_argument(
            "--allow-other-weights",
            action="store_true",
            help="use a unit map scored on other weights of the same shapes (e.g. a base model's map on its instruct "
            "sibling); refused by default",
        )
    add_progress_argument(parser)
    add_overwrite_argument(parser)
    return parser


def _parts_argument(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--parts",
        choices=("out_proj", "all"),
        default="out_proj",
        help=f"{verb} the units' output projections only, or all their weights",
    )


def _wrote(*paths: Path) -> int:
    """Report the files an analysis wrote; its exit status."""
    print("wrote " + " and ".join(map(str, paths)))
    return 0


def _check_outputs(args: argparse.Namespace, stem: str, kind: str, names: tuple[str, ...] = ()) -> None:
    """``--out-dir`` can take ``<stem>.png``, ``<stem>.csv`` and the result files ``names`` of ``kind``."""
    files = {f"{stem}.png": PNG, f"{stem}.csv": FIGURE_DATA, **{name: kind for name in names}}
    check_output_dir(args.out_dir, "--out-dir", files, overwrite=args.overwrite)


def register_probe(subparsers: Any) -> None:
    parser = _analysis_parser(
        subparsers, "probe", "reasoning-direction probe: refusal vs compliance per block", system_prompt=True
    )
    parser.add_argument("--prompts", default="harmful_eval", help="built-in set or JSONL with a prompt field")
    parser.add_argument("--limit", type=positive_int, default=30, help="number of harmful prompts")
    parser.add_argument(
        "--max-appended", type=positive_int, default=10, help="continuation tokens appended to each prompt"
    )
    parser.add_argument(
        "--mean-over-appended", action="store_true", help="average the distances over the appended tokens"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass")
    parser.set_defaults(handler=_probe)


def _probe(args: argparse.Namespace) -> int:
    _check_outputs(args, "probe", PROBE_RESULT, ("probe.json",))
    with user_errors(args.prompts):
        prompts = read_prompts(args.prompts, args.limit)
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    model, tokenizer = load_model(args)
    result = probe_reasoning_direction(
        model,
        tokenizer,
        prompts,
        max_appended=args.max_appended,
        mean_over_appended=args.mean_over_appended,
        batch_size=args.batch_size,
        system_prompt=args.system_prompt,
        show_progress=not args.no_progress,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"The model {result.verdict()}")
    return _wrote(result.save(args.out_dir / "probe.json"), plot_probe(result, args.out_dir / "probe.png"))


def register_ablate(subparsers: Any) -> None:
    description = "ablate each unit type of a map and measure safety and utility"
    parser = _analysis_parser(subparsers, "ablate", description, unit_map="unit map file of this model")
    parser.add_argument(
        "--types",
        nargs="+",
        default=["SCU", "UCU", "RU", "CU"],
        choices=("SCU", "UCU", "RU", "CU"),
        help="unit types to ablate, one row each",
    )
    parser.add_argument(
        "--no-random-control", action="store_true", help="leave out the row of random units as many as the SCU"
    )
    _parts_argument(parser, "zero")
    parser.add_argument("--limit", type=positive_int, default=20, help="records of each evaluation set")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per prompt")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts per generation batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random control units")
    parser.set_defaults(handler=_ablate)


def _load_checked(args: argparse.Namespace, unit_map: UnitMap) -> tuple[Any, Any]:
    """The model, checked against the unit map before anything is done with either."""
    check_model_source(args.model, embedded=EMBEDDED_MODELS)
    model, tokenizer = load_model(args)
    with user_errors(args.unit_map):
        unit_map.check_model(model, allow_other_weights=args.allow_other_weights)
    return model, tokenizer


def _ablate(args: argparse.Namespace) -> int:
    _check_outputs(args, "ablation", ABLATION_TABLE, ("ablation.json",))
    unit_map = load_unit_map(args.unit_map, "--unit-map")
    model, tokenizer = _load_checked(args, unit_map)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, show_progress=not args.no_progress
    )
    table = ablation_table(
        model,
        tokenizer,
        unit_map,
        args.types,
        not args.no_random_control,
        parts=args.parts,
        limit=args.limit,
        settings=settings,
        seed=args.seed,
        allow_other_weights=args.allow_other_weights,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(table.markdown())
    return _wrote(table.save(args.out_dir / "ablation.json"), plot_ablation(table, args.out_dir / "ablation.png"))


def register_scan(subparsers: Any) -> None:
    description = "size the unit groups by a degradation scan; reclassify the map"
    parser = _analysis_parser(
        subparsers, "scan", description, unit_map="unit map of this model whose scores are ranked"
    )
    parser.add_argument(
        "--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA), help="unit groups to size, one scan each"
    )
    parser.add_argument(
        "--fractions",
        type=positive_fraction,
        nargs="+",
        help=f"fractions of all units to scan, each in (0, 1] (default: {' '.join(map(str, DEFAULT_FRACTIONS))})",
    )
    parser.add_argument("--limit", type=positive_int, default=12, help="prompts / texts per metric")
    _parts_argument(parser, "prune")
    parser.add_argument(
        "--out-map", help="write the map reclassified with the chosen fractions here (default: no map is written)"
    )
    parser.set_defaults(handler=_scan)


def _scan(args: argparse.Namespace) -> int:
    _check_outputs(args, "scan", SCAN_RESULT, tuple(f"scan_{criterion}.json" for criterion in args.criteria))
    check_output_file(args.out_map, "--out-map", UNIT_MAP, overwrite=args.overwrite)
    unit_map = load_unit_map(args.unit_map, "--unit-map")
    model, tokenizer = _load_checked(args, unit_map)
    safety, utility = scores_of(unit_map)
    metric_fn = cheap_metrics(tokenizer, limit=args.limit)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"fractions": args.fractions} if args.fractions else {}
    chosen, results = {}, []
    for criterion in args.criteria:
        result = degradation_scan(
            model,
            tokenizer,
            safety,
            utility,
            criterion,
            metric_fn=metric_fn,
            parts=args.parts,
            standardize=unit_map.settings["standardize"],
            ranking=unit_map.settings["ranking"],
            unit_map=unit_map,
            show_progress=not args.no_progress,
            **extra,
        )
        chosen[criterion.lower()] = result.chosen_fraction
        print(f"{criterion}: chosen fraction {result.chosen_fraction} (scanned {result.fractions})")
        result.save(args.out_dir / f"scan_{criterion}.json")
        results.append(result)
    print(f"wrote {plot_scan(results, args.out_dir / 'scan.png')}")
    if args.out_map:
        rescanned = reclassified(unit_map, **chosen)
        rescanned.save(args.out_map)
        print(rescanned.summary())
        print(f"wrote {args.out_map}")
    return 0


def register_report(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "report",
        "assemble the figures and tables of a run directory into report.md",
        analysis_report.__doc__.split("\n\n", 1)[1],
        RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="run directory with the result files (see above)")
    add_overwrite_argument(parser)
    parser.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    """Handler of ``ssah-peft report``: reads every result file first (errors name it), refuses to overwrite files
    ssah-peft did not write, then builds the report."""
    run_dir = args.run_dir
    if not run_dir.is_dir():
        raise CLIError(f"{run_dir} {'is not a folder' if run_dir.exists() else 'does not exist'}; give a run directory")
    results = {name: run_dir / f"{name}.json" for name in ("probe", "ablation") if (run_dir / f"{name}.json").is_file()}
    scans, maps = sorted(run_dir.glob("scan_*.json")), sorted(run_dir.glob("unitmap*.safetensors"))
    figures = [*results, *(["scan"] if scans else []), *(path.stem for path in maps)]
    if {"unitmap_before", "unitmap_after"} <= {path.stem for path in maps}:
        figures.append("migration")
    if not figures:
        raise CLIError(
            f"{run_dir} holds none of probe.json, ablation.json, scan_*.json, unitmap*.safetensors; give "
            "a run directory the probe, ablate or scan commands wrote into (their --out-dir)"
        )
    files = {"report.md": (ANALYSIS_REPORT, EVAL_REPORT_PART)}
    for name in figures:
        files.update({f"figures/{name}.png": PNG, f"figures/{name}.csv": FIGURE_DATA})
    check_output_dir(run_dir, "run directory", files, overwrite=args.overwrite)
    readers = {"probe": ProbeResult.load, "ablation": AblationTable.load}
    for path, read in [*((results[name], readers[name]) for name in results), *((p, ScanResult.load) for p in scans)]:
        with user_errors(path):  # a broken result file is named here, not deep in build_report
            read(path)
    for path in maps:
        load_unit_map(path, "unit map")
    print(f"wrote {build_report(run_dir)}")
    return 0
