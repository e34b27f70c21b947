"""Frontier v2 (issue 26): each chooser's frozen units against independent random draws of its own per-layer counts,
compared at a matched task loss on training curves, with Holm-corrected permutation tests.

Attacks the demo's aligned model (``make demo`` makes ``runs/demo/align/aligned_model`` and
``runs/demo/units/unitmap_aligned.safetensors``) in protect mode, or with ``--model`` a model aligned by its makers
(issue 28: ``--model qwen2.5-coder-1.5b-instruct --results benchmarks/results/scale_qwen1.5b``; every unit map scored
on it and cached under ``--out``; ``--learning-rate`` sets the attack's rate for every method).

A cell is (attack, chooser, budget): the chooser at each seed and its random control at each draw and seed
(``ssah_peft.experiments.frontier_curves``)::

    python benchmarks/frontier_v2.py --cells task:snip:0.2                 # one cell: 3 + 15 runs, LoRA beside
    python benchmarks/frontier_v2.py --cells task:snip:0.2,task:ssah:0.2 --seeds 0,1,2 --draws 0,1,2,3,4
    python benchmarks/frontier_v2.py --cells task:snip:0.2:protect_out_proj   # matched by frozen parameters
    python benchmarks/frontier_v2.py --report-only
    python benchmarks/frontier_v2.py --quick --demo runs/demo-quick --results /tmp/v2 --checkpoints 1,2   # smoke

Resumable: each run's result (curve points and final rates, no reply text) is stored under
``--results/runs/<attack>/seed<s>/<run>.json`` and committed, so a later sitting, on any machine, goes on where this
one stopped; replies and the sweep's unit maps go to ``--out``. After every run ``results.csv``, ``summary.md``,
``curves.png`` and ``selectivity.png`` are rewritten from every stored run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ssah_peft._files import write_text
from ssah_peft.cli.options import comma_list
from ssah_peft.experiments import DemoConfig, check_run_dir
from ssah_peft.experiments.chooser_maps import missing_demo_outputs, sweep_unit_maps
from ssah_peft.experiments.curves import CHECKPOINTS, curve_sets, measure_point, measure_settings
from ssah_peft.experiments.frontier import FrontierRun, check_runs
from ssah_peft.experiments.frontier_curves import (
    CHOOSER_COSTS_FILE,
    CSV_COLUMNS,
    DRAWS,
    REFERENCE_RUNS,
    cell_runs,
    chooser_cost_lines,
    comparisons,
    curve_rows,
    curve_run,
    plot_curves,
    summary_lines,
)


def cell(text: str) -> tuple[str, str, float, str]:
    """``attack:chooser:budget[:setting]`` (setting: protect, or protect_out_proj to match frozen parameters)."""
    attack, chooser, budget, *setting = text.split(":")
    return attack, chooser, float(budget), setting[0] if setting else "protect"


def sets_of(args, attack: str):
    """What this sweep's curves of ``attack`` measure."""
    return curve_sets(attack, limit=4 if args.quick else None, task_items=args.task_items)


def stored_results(args) -> list[dict]:
    """Every stored run; a run measured with other settings than this sweep's (margin openings, prompt or item
    counts) is an error naming its file: its points are on another scale and would be compared as if they were
    not."""
    results = []
    for path in sorted((args.results / "runs").glob("*/seed*/*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("measures") != measure_settings(sets_of(args, result["attack"])):
            raise SystemExit(
                f"{path} was measured with other settings ({result.get('measures')}); rerun with its --task-items, or "
                "delete it (and aligned.json) to measure it again"
            )
        results.append(result)
    return results


def write_summary(args, seconds: float) -> None:
    results = stored_results(args)
    if not results:
        return
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(curve_rows(results))
    write_text(args.results / "results.csv", buffer.getvalue())
    attacked = [r for r in results if r["chooser"] not in REFERENCE_RUNS]
    task_items = "all 250" if args.task_items is None else f"{args.task_items} (spread over the 250)"
    rows = comparisons(attacked)
    plot_curves(results, args.results / "curves.png")
    plot_curves(results, args.results / "selectivity.png", measure="selectivity")
    lines = [
        "# Frontier v2: chosen units against random units of the same counts, at matched task loss",
        "",
        f"Command: `python benchmarks/frontier_v2.py` (resumable); the last invocation was `{args.command}`"
        + (f", {seconds / 60:.1f} min wall on {torch.get_num_threads()} threads." if seconds else "."),
        "",
        f"Runs stored: {len(results)} ({len(attacked)} in comparisons). Each run trains the demo's aligned model in "
        "protect mode (rank 8) at the attack's learning rate and measures, at steps "
        f"{', '.join(map(str, args.checkpoints))}, the refusal margin on every held-out harmful prompt and look-alike "
        f"and the task loss on {task_items} task test items (held-out persona records for the identity shift). A "
        "chooser's "
        "runs (one per seed) are compared with its random control's (one independent draw per draw index and seed) "
        "at the lowest task loss every run of the cell reaches: a two-sample permutation test with runs as units, "
        "Holm-corrected over every row of the table. Claims only where p (Holm) < 0.05.",
        "",
        "![curves](curves.png)",
        "",
        "![selectivity](selectivity.png)",
        "",
        *summary_lines(results, rows),
        "",
    ]
    costs = args.results / CHOOSER_COSTS_FILE
    if costs.is_file():
        lines += [*chooser_cost_lines(json.loads(costs.read_text(encoding="utf-8"))), ""]
    write_text(args.results / "summary.md", "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo run dir with the aligned model")
    parser.add_argument("--model", help="attack this model (embedded name, hub id, folder) instead of the demo's")
    parser.add_argument("--dtype", default="float32", help="the --model's weights (bfloat16 on CPUs with AVX-512 BF16)")
    parser.add_argument("--learning-rate", type=float, help="the attack's learning rate for every method")
    parser.add_argument("--out", type=Path, default=Path("runs/frontier_v2"), help="replies and unit maps")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/frontier_v2"))
    parser.add_argument(
        "--cells",
        type=comma_list(cell),
        default=[("task", "snip", 0.2, "protect")],
        help="attack:chooser:budget[:setting], setting protect (default) or protect_out_proj",
    )
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--draws", type=comma_list(int), default=list(DRAWS))
    parser.add_argument("--checkpoints", type=comma_list(int), default=list(CHECKPOINTS))
    parser.add_argument(
        "--task-items", type=int, help="task test items of the task loss, spread over the set (default: all 250)"
    )
    parser.add_argument("--references", type=comma_list(str), default=["lora"], help="reference runs per seed")
    parser.add_argument("--report-only", action="store_true", help="write the results of the stored runs only")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: the quick demo's sizes, 4 prompts and items per measure"
    )
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    args.command = shlex.join(["python", *sys.argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.report_only:
        write_summary(args, 0.0)
        return 0
    missing = [] if args.model else missing_demo_outputs(args.demo)
    if missing:
        parser.error(f"{', '.join(map(str, missing))} missing: run `make demo` first (stages 1-3 make them)")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        parser.error(f"--dtype {args.dtype!r} is not a torch floating-point dtype")
    if args.learning_rate is not None and not 0 < args.learning_rate < 1:
        parser.error(f"--learning-rate must be in (0, 1), got {args.learning_rate}")
    rates = (
        {}
        if args.learning_rate is None
        else {"attack_learning_rates": dict.fromkeys(("full", "lora", "ssah_protect"), args.learning_rate)}
    )

    def preset(**options):
        return (DemoConfig.quick if args.quick else DemoConfig.full)(**{**rates, **options})

    config = preset(run_dir=args.out, show_progress=False)
    check_run_dir(config)

    runs: list[FrontierRun] = []
    for attack, chooser, budget, setting in args.cells:
        runs += [FrontierRun(attack, "reference", name, 0.0, seed) for name in args.references for seed in args.seeds]
        runs += cell_runs(attack, chooser, budget, args.seeds, args.draws, setting)
    runs = list(dict.fromkeys(runs))
    runs.sort(key=lambda run: run.seed)  # whole seeds first: an interrupted sweep has paired runs

    def result_path(run: FrontierRun) -> Path:
        return args.results / "runs" / run.attack / f"seed{run.seed}" / f"{run.name}.json"

    pending = [run for run in runs if not result_path(run).is_file()]
    maps = sweep_unit_maps(config, args.demo, args.out / "maps", pending, "frontier_v2", args.model, dtype)
    load_aligned = maps.load_aligned
    check_runs(pending, maps.maps)
    starts: dict[str, dict] = {}
    for index, run in enumerate(pending, 1):
        sets = sets_of(args, run.attack)
        if run.attack not in starts:
            path = args.results / "runs" / run.attack / "aligned.json"
            settings = measure_settings(sets)
            if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("measures") == settings:
                starts[run.attack] = json.loads(path.read_text(encoding="utf-8"))
            else:
                model, tokenizer = load_aligned()
                with torch.no_grad():
                    starts[run.attack] = {**measure_point(model.eval(), tokenizer, sets), "measures": settings}
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text(path, json.dumps(starts[run.attack], indent=1) + "\n")
        print(f"[frontier_v2] {index}/{len(pending)}: {run.attack} seed {run.seed} {run.name}", file=sys.stderr)
        config_of_run = preset(run_dir=args.out, show_progress=False, seed=run.seed)
        curve_run(
            config_of_run,
            load_aligned,
            run,
            run.unit_map(maps),
            sets,
            result_path(run),
            args.out / "runs" / run.attack / f"seed{run.seed}" / run.name,
            args.checkpoints,
            starts[run.attack],
        )
        write_summary(args, time.perf_counter() - start)
    write_summary(args, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
