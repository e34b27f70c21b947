"""The protection frontier (issue 17): do SSAH's units protect better than as many other units?

Attacks the demo's aligned model (``make demo`` makes it: ``runs/demo/align/aligned_model`` and its unit map
``runs/demo/units/unitmap_aligned.safetensors``) with the demo's two benign fine-tuning attacks, freezing a budget of
units chosen by SSAH, by the rival scorers Wanda and SNIP, and at random with SSAH's per-layer counts; in protect
mode (a LoRA-like update) and densely (select mode on every other unit, the paper's setting); full fine-tuning and
LoRA are the reference points. Every run is the demo's stage-4 run (``ssah_peft.experiments.frontier``)::

    python benchmarks/frontier.py                      # the whole sweep: 5 budgets x 3 seeds x 2 attacks
    python benchmarks/frontier.py --seeds 0 --attacks task --budgets 0.075,0.72   # a slice
    python benchmarks/frontier.py --report-only        # tables and figure from the runs computed so far
    python benchmarks/frontier.py --choosers snip,random_snip --settings protect   # SNIP vs random of its counts
    # a v2 selector against five independent draws of its control, frozen parameters matched (issue 26)
    python benchmarks/frontier.py --choosers refusal_direction,random_refusal_direction --draws 0,1,2,3,4 \
        --settings protect_out_proj --budgets 0.075,0.2

Every chooser of ``ssah_peft.experiments.choosers.CHOOSERS`` and its control (``random_<chooser>``) can be named;
the unit maps they read are made once and cached under ``--out``/maps (``ssah_peft.experiments.chooser_maps``).

Resumable: each run's result is cached under ``--out`` (``<attack>/seed<s>/<run>/result.json``), so an interrupted
sweep goes on where it stopped; runs are ordered seed by seed, and a slice computes only its runs. After every
run, the results of all runs of the whole sweep cached so far are rewritten into ``--results``: ``results.csv`` (one
row per run), ``summary.md`` (mean ± sd over seeds, pooled 95% Wilson intervals, paired differences from random)
and ``frontier.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ssah_peft.cli.options import comma_list
from ssah_peft.experiments import ATTACK_SETS, DemoConfig, check_run_dir
from ssah_peft.experiments.chooser_maps import missing_demo_outputs, sweep_unit_maps
from ssah_peft.experiments.frontier import (
    ALL_CHOOSERS,
    BUDGETS,
    DEFAULT_CHOOSERS,
    DEFAULT_SETTINGS,
    OTHER_CHOOSERS,
    SETTINGS,
    FrontierRun,
    check_runs,
    frontier_runs,
)
from ssah_peft.experiments.frontier_figure import frontier_points, plot_frontier
from ssah_peft.experiments.frontier_tables import frontier_markdown, frontier_row, write_rows
from ssah_peft.experiments.stages import attack_result


def cached_results(root: Path, seeds: list[int], draws: list[int]) -> dict[FrontierRun, dict]:
    """The result of every run of every chooser and control, every setting, at ``seeds`` (and 0, 1, 2), with the
    controls' own draws and their independent ``draws``, that is cached under ``root``: what the tables show,
    whichever slice this invocation runs."""
    every = {"choosers": ALL_CHOOSERS, "settings": tuple(SETTINGS), "seeds": sorted({0, 1, 2, *seeds})}
    runs = frontier_runs(**every) + [run for run in frontier_runs(**every, draws=draws) if run.draw is not None]
    results = {}
    for run in runs:
        path = run.run_dir(root) / "result.json"
        if path.is_file():
            results[run] = json.loads(path.read_text(encoding="utf-8"))
    return results


def write_results(args, seconds: float) -> None:
    """CSV, Markdown summary and figure of every run computed so far (:func:`cached_results`)."""
    results = cached_results(args.out / "runs", args.seeds, args.draws)
    if not results:
        return
    rows = [frontier_row(run, result) for run, result in results.items()]
    default = set(frontier_runs()) & set(results)
    write_rows(rows, args.results / "results.csv")
    # the choosers outside the default sweep in a figure of their own, with SSAH and random at the same attacks,
    # settings and budgets
    variants = [r for r in rows if r["chooser"] in OTHER_CHOOSERS]
    where = {(r["attack"], r["setting"], r["budget"]) for r in variants}
    beside = [
        r for r in rows if r["chooser"] in ("ssah", "random") and (r["attack"], r["setting"], r["budget"]) in where
    ]
    plot_frontier(
        frontier_points([r for r in rows if r["chooser"] not in OTHER_CHOOSERS]),
        args.results / "frontier.png",
        title="attack:",
    )
    if variants:
        plot_frontier(frontier_points(beside + variants), args.results / "variants.png", title="variants, attack:")
    compute = sum(r["train_seconds"] + r["eval_seconds"] for r in rows)
    aligned = json.loads((args.demo / "align" / "ssah_select" / "result.json").read_text(encoding="utf-8"))
    lines = [
        "# Protection frontier",
        "",
        "Command: `python benchmarks/frontier.py` (resumable; slices by `--seeds/--choosers/--settings/--attacks/"
        f"--budgets`). These tables cover every cached run; the last invocation was `{args.command}`.",
        "",
        f"Runs: {len(default)} of the default sweep's {len(frontier_runs())}, and {len(rows) - len(default)} "
        f"outside it (rival controls, variants); training and evaluation of those runs: {compute / 60:.1f} min"
        + (
            f" (the last invocation: {seconds / 60:.1f} min wall, on {torch.get_num_threads()} threads)."
            if seconds
            else "."
        ),
        "",
        "The aligned model before any attack (the demo's `ssah_select` alignment): "
        f"ASR {aligned['metrics']['asr']:.3f}, task accuracy {aligned['metrics']['task_accuracy']:.3f}. "
        "Each attack is the demo's stage-4 run (same data, "
        "steps and learning rates; dense runs take full fine-tuning's). `frozen`: the share of all units frozen. "
        "Choosers: `ssah` SCU then CU by I_S − I_U (variance scores); `wanda`/`snip` the rival scores' difference "
        "I_S − I_U (Wei et al. 2024's safety attribution); `random` random units with SSAH's per-layer counts, "
        "drawn anew for each seed. Settings: `protect` SSAH protect mode (rank-8 update, the units' slices held at "
        "zero); `dense` every other unit trained densely (select mode on the complement). Training seed = row seed. "
        "Variants, outside the default sweep and each paired with random units of its own per-layer counts "
        "(`random_<variant>`): `ssah_std` SSAH on I_S and I_U z-scored per layer and kind; `ssah_attn` / `ssah_mlp` "
        "the budget from attention channels / MLP neurons only; `ssah_prompt` SSAH scored on the prompt tokens.",
        "",
        "![frontier](frontier.png)",
        "",
        *(["![variants](variants.png)", ""] if variants else []),
        *frontier_markdown(rows),
        "",
    ]
    (args.results / "summary.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo run dir with the aligned model")
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"), help="run dir of the sweep (cached runs)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/frontier"))
    parser.add_argument("--budgets", type=comma_list(float), default=list(BUDGETS))
    parser.add_argument("--choosers", type=comma_list(str), default=list(DEFAULT_CHOOSERS))
    parser.add_argument("--settings", type=comma_list(str), default=list(DEFAULT_SETTINGS))
    parser.add_argument("--attacks", type=comma_list(str), default=list(ATTACK_SETS))
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument(
        "--draws",
        type=comma_list(int),
        default=[],
        help="independent random draws of every control (e.g. 0,1,2,3,4) instead of one draw per seed",
    )
    parser.add_argument("--report-only", action="store_true", help="write the results of the cached runs only")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    args.command = shlex.join(["python", *sys.argv])
    if args.threads:
        torch.set_num_threads(args.threads)

    unknown = sorted(set(args.choosers) - set(ALL_CHOOSERS)) + sorted(set(args.settings) - set(SETTINGS))
    if unknown or not all(0 < b < 1 for b in args.budgets):
        parser.error(f"unknown choosers/settings {unknown} or a budget outside (0, 1): {args.budgets}")
    missing = missing_demo_outputs(args.demo)
    if missing:
        parser.error(f"{', '.join(map(str, missing))} missing: run `make demo` first (stages 1-3 make them)")
    config = DemoConfig.full(run_dir=args.out, show_progress=False)
    demo_settings = json.loads((args.demo / "config.json").read_text(encoding="utf-8"))
    if demo_settings != config.to_json():
        parser.error(f"{args.demo} was made with other settings than DemoConfig.full(); use a default demo run")
    check_run_dir(config)
    runs = frontier_runs(args.budgets, args.choosers, args.settings, args.attacks, args.seeds, args.draws or None)

    start = time.perf_counter()
    if args.report_only:
        write_results(args, 0.0)
        return 0
    maps = sweep_unit_maps(config, args.demo, args.out / "maps", runs, "frontier")
    try:
        check_runs([run for run in runs if not (run.run_dir(args.out / "runs") / "result.json").is_file()], maps.maps)
    except ValueError as error:
        parser.error(str(error))
    for index, run in enumerate(runs, 1):
        run_dir = run.run_dir(args.out / "runs")
        if (run_dir / "result.json").is_file():
            continue
        elapsed = time.perf_counter() - start
        print(
            f"[frontier] {index}/{len(runs)} {run.attack} seed {run.seed} {run.name} ({elapsed / 60:.1f} min)",
            file=sys.stderr,
            flush=True,
        )
        attack_result(
            replace(config, seed=run.seed), maps.load_aligned, run.attack, run.method(), run.unit_map(maps), run_dir
        )
        write_results(args, time.perf_counter() - start)
    write_results(args, time.perf_counter() - start)
    print(f"[frontier] {len(runs)} runs done; results in {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
