"""``ssah-peft probe``, ``ssah-peft ablate`` and ``ssah-peft scan``: the analyses on a model from the command line.

Each writes its result file into ``--out-dir`` under the run-directory names of :mod:`.report`, so that
``ssah-peft report RUN_DIR`` can assemble them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..evaluate import GenerationSettings
from ..models import DEFAULT_MODEL
from ..unit_map import UnitMap
from .ablation import ablation_table
from .figures import plot_ablation, plot_probe, plot_scan
from .probe import probe_reasoning_direction
from .scan import CRITERIA, cheap_metrics, degradation_scan, scores_of


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, hub id or path ({DEFAULT_MODEL})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device-map", help='e.g. "auto", "cpu", "cuda:0"')
    parser.add_argument("--load-in-4bit", action="store_true", help="load the model in NF4 with bitsandbytes")
    parser.add_argument("--out-dir", type=Path, required=True, help="run directory for the result files")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from ..models import load

    device_map = args.device_map or ("cpu" if args.load_in_4bit and not torch.cuda.is_available() else None)
    return load(args.model, dtype=args.dtype, device_map=device_map, load_in_4bit=args.load_in_4bit)


def _prompts(source: str, limit: int) -> list[str]:
    """Prompts of a built-in data set or of a JSONL file with a ``prompt`` field."""
    if Path(source).is_file():
        records = [json.loads(line) for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from ..data import load_builtin

        records = list(load_builtin(source))
    return [str(r["prompt"]) for r in records][:limit]


def register_probe(subparsers: Any) -> None:
    parser = subparsers.add_parser("probe", help="reasoning-direction probe: refusal vs compliance per block")
    _model_arguments(parser)
    parser.add_argument("--prompts", default="harmful_eval", help="built-in set or JSONL with a prompt field")
    parser.add_argument("--limit", type=int, default=30, help="number of harmful prompts")
    parser.add_argument("--max-appended", type=int, default=10)
    parser.add_argument("--mean-over-appended", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--system-prompt")
    parser.set_defaults(handler=_probe)


def _probe(args: argparse.Namespace) -> int:
    prompts = _prompts(args.prompts, args.limit)
    model, tokenizer = _load(args)
    result = probe_reasoning_direction(
        model, tokenizer, prompts, max_appended=args.max_appended, mean_over_appended=args.mean_over_appended,
        batch_size=args.batch_size, system_prompt=args.system_prompt, show_progress=not args.no_progress,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"The model {result.verdict()}")
    print(f"wrote {result.save(args.out_dir / 'probe.json')} and {plot_probe(result, args.out_dir / 'probe.png')}")
    return 0


def register_ablate(subparsers: Any) -> None:
    parser = subparsers.add_parser("ablate", help="ablate each unit type of a map and measure safety and utility")
    _model_arguments(parser)
    parser.add_argument("--unit-map", required=True, help="unit map file of this model")
    parser.add_argument("--types", nargs="+", default=["SCU", "UCU", "RU", "CU"], choices=("SCU", "UCU", "RU", "CU"))
    parser.add_argument("--no-random-control", action="store_true")
    parser.add_argument("--parts", choices=("out_proj", "all"), default="out_proj")
    parser.add_argument("--limit", type=int, default=20, help="records of each evaluation set")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    unit_map = UnitMap.load(args.unit_map)
    model, tokenizer = _load(args)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  show_progress=not args.no_progress)
    table = ablation_table(model, tokenizer, unit_map, args.types, not args.no_random_control, parts=args.parts,
                           limit=args.limit, settings=settings, seed=args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(table.markdown())
    png = plot_ablation(table, args.out_dir / "ablation.png")
    print(f"wrote {table.save(args.out_dir / 'ablation.json')} and {png}")
    return 0


def register_scan(subparsers: Any) -> None:
    parser = subparsers.add_parser("scan", help="size the unit groups by a degradation scan; reclassify the map")
    _model_arguments(parser)
    parser.add_argument("--unit-map", required=True, help="unit map whose scores are ranked")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    parser.add_argument("--fractions", type=float, nargs="+", help="fractions of all units to scan")
    parser.add_argument("--limit", type=int, default=12, help="prompts / texts per metric")
    parser.add_argument("--parts", choices=("out_proj", "all"), default="out_proj")
    parser.add_argument("--out-map", help="write the map reclassified with the chosen fractions here")
    parser.set_defaults(handler=_scan)


def _scan(args: argparse.Namespace) -> int:
    unit_map = UnitMap.load(args.unit_map)
    model, tokenizer = _load(args)
    safety, utility = scores_of(unit_map)
    metric_fn = cheap_metrics(tokenizer, limit=args.limit)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"fractions": args.fractions} if args.fractions else {}
    chosen, results = {}, []
    for criterion in args.criteria:
        result = degradation_scan(
            model, tokenizer, safety, utility, criterion, metric_fn=metric_fn, parts=args.parts,
            standardize=unit_map.settings["standardize"], ranking=unit_map.settings["ranking"], unit_map=unit_map,
            show_progress=not args.no_progress, **extra,
        )
        chosen[criterion.lower()] = result.chosen_fraction
        print(f"{criterion}: chosen fraction {result.chosen_fraction} (scanned {result.fractions})")
        result.save(args.out_dir / f"scan_{criterion}.json")
        results.append(result)
    print(f"wrote {plot_scan(results, args.out_dir / 'scan.png')}")
    if args.out_map:
        sizes = {**{k: unit_map.settings[k] for k in ("scu", "ucu", "ru")}, **chosen}
        reclassified = UnitMap.from_scores(safety, utility, **sizes, standardize=unit_map.settings["standardize"],
                                           ranking=unit_map.settings["ranking"],
                                           composite_fraction=unit_map.composite_fraction)
        reclassified.calibration, reclassified.metadata = unit_map.calibration, unit_map.metadata
        reclassified.save(args.out_map)
        print(reclassified.summary())
        print(f"wrote {args.out_map}")
    return 0
