"""Sweep the demo's alignment and attack settings: the search behind the defaults of ``ssah_peft.experiments``.

The paper's effects need a moderately strong attack on a well-aligned model; at 135M parameters neither is
given, so the demo's learning rates, steps and aligned base were chosen with this script. Every run is one
``train_method`` + ``evaluate_model`` of the demo, cached under ``--out`` like the demo's own stages::

    # alignment: which learning rate makes RU-only alignment as safe as full fine-tuning
    python benchmarks/demo_sweep.py align --out runs/sweep ssah_select:2e-4 ssah_select:1e-3 full:5e-5
    # attacks on an aligned model (a merged model dir; its unit map is scored once and cached next to the runs)
    python benchmarks/demo_sweep.py attack --out runs/sweep --base runs/demo/align/aligned_model \\
        --data task full:1e-5 lora:2e-4 ssah_protect_top_cu:2e-4

    # the alignment budget's controls (issue 17): RU vs random units of RU's counts vs the lowest-Wanda 20%
    python benchmarks/demo_sweep.py align --out runs/sweep --seeds 0,1,2 \\
        ssah_select:6e-4 ssah_select_random:6e-4 select_lowest_wanda:6e-4

A run is ``METHOD:LR`` with an optional ``:STEPS``; METHOD is a name of the method table
(``ssah_peft.experiments.METHODS``); the unit map of the scorer it chooses with is scored once per stage and
cached. ``--seeds 0,1,2`` repeats every run at those training seeds
(data order and adapter init; the unit map does not depend on them) and adds a mean ± sd table; seed 0 is the
demo's own. ``--save-merged`` keeps an alignment run's merged model as a base for attack sweeps. The table printed
at the end is the demo report's.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssah_peft.evaluate import mean_sd
from ssah_peft.experiments import (
    TABLE_HEADER,
    DemoConfig,
    Method,
    alignment_records,
    attack_records,
    cached_artifact,
    cached_result,
    evaluate_model,
    merged_model,
    method_named,
    table_row,
    train_method,
    unit_map_of,
)
from ssah_peft.models import load
from ssah_peft.unit_map import UnitMap


def parse_run(spec: str, default_steps: int) -> tuple[Method, float, int]:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"a run is METHOD:LR[:STEPS], got {spec!r}")
    try:
        method = method_named(parts[0])
    except KeyError as error:
        raise SystemExit(error.args[0]) from None
    return method, float(parts[1]), int(parts[2]) if len(parts) == 3 else default_steps


def seed_list(text: str) -> list[int]:
    return [int(seed) for seed in text.split(",")]


def seed_summary(by_run: dict[str, list[dict[str, float]]]) -> list[str]:
    """A Markdown table of each run's metrics over its seeds (sample standard deviation)."""
    lines = ["| run | seeds | ASR | over-refusal | task acc. | PPL |", "|---|---:|---:|---:|---:|---:|"]
    for name, runs in by_run.items():
        cells = []
        for key, digits in (("asr", 3), ("overrefusal", 3), ("task_accuracy", 3), ("perplexity", 2)):
            mean, sd = mean_sd([m[key] for m in runs])
            spread = f" ± {sd:.{digits}f}" if len(runs) > 1 else ""
            cells.append(f"{mean:.{digits}f}{spread}")
        lines.append(f"| {name} | {len(runs)} | {' | '.join(cells)} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("align", "attack"))
    parser.add_argument("runs", nargs="+", help="METHOD:LR[:STEPS]")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--base", type=Path, help="attack: the merged aligned model to attack")
    parser.add_argument("--data", default="task", help="attack: task or identity_shift")
    parser.add_argument("--save-merged", action="store_true", help="align: keep the merged model of each run")
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=[0],
        metavar="0,1,2",
        help="training seeds (data order, adapter init); with several, a mean ± sd table follows",
    )
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = DemoConfig.full(run_dir=args.out)
    default_steps = config.align_steps if args.stage == "align" else config.attack_steps

    if args.stage == "align":

        def load_model():
            return load(config.model, dtype=torch.float32)

        fractions, stage_dir = config.alignment_fractions, args.out / "align"
        records = alignment_records(config)
    else:
        if args.base is None:
            parser.error("attack needs --base")

        def load_model():
            return AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32), AutoTokenizer.from_pretrained(
                args.base
            )

        fractions, stage_dir = config.unit_fractions, args.out / "attack" / args.base.name
        records = attack_records(args.data, config)
    maps_dir, map_name = stage_dir, "unitmap_base" if args.stage == "align" else "unitmap"
    unit_maps: dict[str, UnitMap] = {}

    def unit_map_for(method: Method) -> Optional[UnitMap]:
        """The map by the scorer ``method`` chooses with, of the model the stage trains: scored once, cached."""
        if method.units is None:
            return None
        scorer = method.units.scorer
        if scorer not in unit_maps:
            suffix = "" if scorer == "variance" else f"_{scorer}"
            unit_maps[scorer] = cached_artifact(
                maps_dir / f"{map_name}{suffix}.safetensors",
                lambda: unit_map_of(*load_model(), config, fractions, method=scorer),
                UnitMap.load,
            )
        return unit_maps[scorer]

    if args.stage == "attack":
        stage_dir = stage_dir / args.data

    rows, by_run = [], {}
    for seed in args.seeds:
        seeded = replace(config, seed=seed)
        seed_suffix = f"-seed{seed}" if seed else ""  # seed 0 keeps the names of earlier runs
        for spec in args.runs:
            method, lr, steps = parse_run(spec, default_steps)
            run_dir = stage_dir / f"{method.name}-lr{lr:g}-s{steps}{seed_suffix}"

            def compute(method=method, lr=lr, steps=steps, run_dir=run_dir, seeded=seeded):
                print(f"[sweep] {run_dir}", file=sys.stderr, flush=True)
                unit_map = unit_map_for(method)
                model, tokenizer = load_model()
                model, info = train_method(model, tokenizer, records, method, steps, lr, seeded, run_dir, unit_map)
                if args.save_merged:
                    merged = merged_model(model)
                    merged.save_pretrained(run_dir / "merged")
                    tokenizer.save_pretrained(run_dir / "merged")
                return {**info, **evaluate_model(model, tokenizer, seeded)}

            result = cached_result(run_dir / "result.json", compute)
            data = args.data if args.stage == "attack" else "align"
            rows.append(table_row(args.stage, f"{data} lr={lr:g}{seed_suffix}", result))
            by_run.setdefault(f"{method.name} {data} lr={lr:g} steps={steps}", []).append(result["metrics"])
    print("\n".join([*TABLE_HEADER, *rows]))
    if len(args.seeds) > 1:
        print(f"\nMean ± standard deviation over seeds {', '.join(map(str, args.seeds))}:\n")
        print("\n".join(seed_summary(by_run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
