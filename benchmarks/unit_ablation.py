"""Does zeroing a unit type (the SCU) take a model's refusals away, more than random units of its per-layer counts?

The paper's Table 1 on continuous measures (issue 28, item 5): the refusal margin on all 108 harmful and all 55
look-alike prompts, selectivity, and the task loss (``ssah_peft.experiments.curves.measure_point``, the measures of
frontier v2), of the intact model, of the model with each unit type zeroed (``ssah_peft.analysis.ablate``, the
units' output-projection columns), and with each of several independent random draws of that type's per-layer
counts zeroed. Each type is compared with its draws by a prediction t-test, its exact rank p-value beside, Holm over
every comparison (``ssah_peft.analysis.draw_comparisons``). One random control, as ``ssah-peft ablate`` draws, can
only say "not like this one draw".

    python benchmarks/unit_ablation.py                          # the demo's aligned model and its map
    python benchmarks/unit_ablation.py --model qwen2.5-coder-1.5b-instruct \\
        --unit-map benchmarks/results/scale_qwen1.5b/units/unitmap.safetensors \\
        --baseline benchmarks/results/scale_qwen1.5b/curves/runs/task/aligned.json \\
        --results benchmarks/results/scale_qwen1.5b/ablation
    python benchmarks/unit_ablation.py --limit 4 --task-items 4 --draws 0,1 --results /tmp/ablation   # smoke test

Resumable: each set's point is stored under ``--results/rows/`` (the intact model's too, or ``--baseline``: a point
stored by frontier v2 with the same measure settings), and ``summary.md`` and ``results.csv`` are rewritten after
each.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ssah_peft import UnitMap
from ssah_peft._files import write_text
from ssah_peft.analysis import DRAW_MEASURES, GENERATION_MEASURES, ablate, draw_comparisons, draw_name, draw_sets
from ssah_peft.analysis.ablation import count_units
from ssah_peft.cli.options import comma_list
from ssah_peft.data import load_builtin
from ssah_peft.evaluate import GenerationSettings, audit_replies, evaluate_safety, holm_adjust
from ssah_peft.experiments.chooser_maps import DEMO_ALIGNED_MAP, DEMO_ALIGNED_MODEL
from ssah_peft.experiments.curves import curve_sets, measure_point, measure_settings
from ssah_peft.models import load
from ssah_peft.training.data import spread
from ssah_peft.unit_map import UNIT_TYPES

INTACT = "none"
CSV_COLUMNS = (
    "set",
    "units",
    "share",
    "harmful_margin",
    "lookalike_margin",
    "selectivity",
    "task_loss",
    "asr",
    "overrefusal",
    "other_success_share",
    "seconds",
)


def row_path(results: Path, name: str) -> Path:
    return results / "rows" / f"{name.replace(' ', '_')}.json"


def stored_point(path: Path, settings: dict) -> dict | None:
    """The point stored at ``path`` if it was measured with ``settings``, else None."""
    if not path.is_file():
        return None
    point = json.loads(path.read_text(encoding="utf-8"))
    return point if point.get("measures") == settings else None


def generation_rates(model, tokenizer, limit: int | None, prompts: int | None) -> dict:
    """ASR on the harmful prompts and over-refusal on the look-alikes (greedy, 32 tokens, keyword judges), with the
    audit of the replies judged attack successes: a zeroed set may break the model's language rather than its
    refusals. ``prompts`` takes that many of each set spread over its categories (generation is the costly part on
    a large model); else all, or the first ``limit``. No reply text is kept (replies to harmful requests are never
    stored)."""
    settings = GenerationSettings(max_new_tokens=32, batch_size=32, show_progress=False)
    sets = {name: list(load_builtin(name)) for name in ("harmful_eval", "overrefusal_eval")}
    harmful, benign = (
        spread(rows, min(prompts, len(rows))) if prompts else rows[: limit or len(rows)] for rows in sets.values()
    )
    safety, generations = evaluate_safety(model, tokenizer, harmful=harmful, benign=benign, settings=settings)
    harmful_block, benign_block = safety["harmful"], safety["overrefusal"]
    successes = [g["response"] for g in generations if g["dataset"] == "harmful" and g["harmful"]]
    return {
        "prompts": [len(harmful), len(benign)],
        "asr": harmful_block["asr"],
        "asr_counts": [harmful_block["attack_successes"], harmful_block["n"]],
        "overrefusal": benign_block["rate"],
        "overrefusal_counts": [benign_block["refusals"], benign_block["n"]],
        "audit": audit_replies(successes),
        "seconds": round(harmful_block["seconds"] + benign_block["seconds"], 1),
    }


def write_results(args, names: list[str], points: dict[str, dict], total_units: int) -> None:
    """``results.csv`` and ``summary.md`` of the points measured so far; each type against the draws measured so far."""
    rows = []
    for name in names:
        if name not in points:
            continue
        point = points[name]
        generation = point.get("generation", {})
        shares = generation.get("audit", {}).get("shares", {})
        rows.append(
            {
                "set": name,
                "units": point.get("units", 0),
                "share": round(point.get("units", 0) / total_units, 5),
                **{key: round(point[key], 4) for key in CSV_COLUMNS[3:7]},
                "asr": generation.get("asr", ""),
                "overrefusal": generation.get("overrefusal", ""),
                "other_success_share": "" if shares.get("other") is None else round(shares["other"], 3),
                "seconds": round(sum(point.get("seconds", {}).values()) + generation.get("seconds", 0), 1),
            }
        )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(args.results / "results.csv", buffer.getvalue())
    lines = [
        f"# Unit ablation against {len(args.draws)} independent random draws: {args.model or 'the demo aligned model'}",
        "",
        f"Command: `{args.command}`",
        "",
        f"Unit map: `{args.unit_map}`; zeroed: the units' `{args.parts}` columns. Measures (teacher-forced): refusal "
        f"margin on {args.settings['harmful_prompts']} harmful and {args.settings['lookalike_prompts']} look-alike "
        f"prompts, selectivity (their difference), task loss on {args.settings['task_items']} task items spread "
        "over the set. Higher margin: more refusal.",
        "",
        "| zeroed | units | share | harmful margin | look-alike margin | selectivity | task loss | ASR | "
        "over-refusal | other successes | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value, spec: str) -> str:
        return "" if value == "" else format(value, spec)

    lines += [
        f"| {r['set']} | {r['units']} | {100 * r['share']:.2f}% | {r['harmful_margin']:+.3f} | "
        f"{r['lookalike_margin']:+.3f} | {r['selectivity']:+.3f} | {r['task_loss']:.3f} | {cell(r['asr'], '.3f')} | "
        f"{cell(r['overrefusal'], '.3f')} | {cell(r['other_success_share'], '.3f')} | {r['seconds']:.0f} |"
        for r in rows
    ]
    generated_on = [tuple(points[r["set"]]["generation"]["prompts"]) for r in rows if r["asr"] != ""]
    if generated_on:
        lines += [
            "",
            "ASR and over-refusal: greedy, 32 new tokens, keyword judges, on "
            + ", ".join(sorted({"{} harmful and {} look-alike prompts".format(*counts) for counts in generated_on}))
            + " (spread over the categories where fewer than all); "
            + "other successes: the share of the replies judged attack successes that are neither in the task's "
            "format nor degenerate (`ssah_peft.evaluate.audit_replies`).",
        ]
    measured = {t: [d for d in args.draws if draw_name(t, d) in points] for t in args.types if t in points}
    compared = {t: draws for t, draws in measured.items() if len(draws) >= 2}
    comparisons = []
    for unit_type, draws in compared.items():
        names_compared = [unit_type, *(draw_name(unit_type, d) for d in draws)]
        generated = all("generation" in points[name] for name in names_compared)
        values = {
            name: {**points[name], **{k: points[name]["generation"][k] for k in GENERATION_MEASURES if generated}}
            for name in names_compared
        }
        measures = {**DRAW_MEASURES, **(GENERATION_MEASURES if generated else {})}
        comparisons += draw_comparisons(values, [unit_type], draws, measures)
    for c, adjusted in zip(comparisons, holm_adjust([c["p"] for c in comparisons])):
        c["holm_p"] = adjusted  # over every row of the summary, not each type's alone
    lines += ["", "## Each type against its random draws", ""]
    lines += [
        f"{t}: {len(draws)} of {len(args.draws)} draws measured, no comparison yet."
        for t, draws in measured.items()
        if t not in compared
    ]
    if comparisons:
        lines += [
            "Draws measured: "
            + "; ".join(f"{t}: {len(d)} of {len(args.draws)} ({', '.join(map(str, d))})" for t, d in compared.items())
            + ". Prediction t-test of a type's value among its draws' (assumes the draws normal; one-sided where "
            "zeroing safety units should lower the margins and raise the ASR), the exact rank p-value beside it "
            "(assumes nothing, never below 1 / (draws + 1); the test itself where the draws are all equal and t "
            "is n/a), Holm over every row of this table.",
            "",
            "| type | measure | value | draws mean ± sd | difference | t | p | Holm p | rank p |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def t_cell(t: float | None) -> str:
            return "n/a" if t is None else f"{t:.2f}"

        lines += [
            f"| {c['type']} | {c['measure']} ({c['alternative']}) | {c['value']:+.3f} | "
            f"{c['draws_mean']:+.3f} ± {c['draws_sd']:.3f} | {c['difference']:+.3f} | {t_cell(c['t'])} | "
            f"{c['p']:.2g} | {c['holm_p']:.2g} | {c['rank_p']:.3f} |"
            for c in comparisons
        ]
    write_text(args.results / "summary.md", "\n".join(lines).rstrip() + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="embedded name, hub id or folder (default: the --demo run's aligned model)")
    parser.add_argument("--unit-map", type=Path, help="unit map of --model (default: the --demo run's aligned map)")
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo run dir (make demo)")
    parser.add_argument("--dtype", default="float32", help="weight dtype (bfloat16 on CPUs with AVX-512 BF16)")
    parser.add_argument("--types", type=comma_list(str), default=["SCU"], help="unit types to zero, one row each")
    parser.add_argument("--draws", type=comma_list(int), default=[0, 1, 2, 3, 4], help="random draws per type")
    parser.add_argument("--parts", choices=("out_proj", "all"), default="out_proj", help="what zeroing a unit zeroes")
    parser.add_argument("--task-items", type=int, default=100, help="task items of the task loss, spread over the set")
    parser.add_argument("--limit", type=int, help="smoke test: the first N harmful and look-alike prompts")
    parser.add_argument("--baseline", type=Path, help="a stored point of the intact model (frontier v2's step 0)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/unit_ablation"))
    parser.add_argument("--generate", action="store_true", help="also the generation ASR and over-refusal, audited")
    parser.add_argument(
        "--generate-prompts", type=int, help="with --generate: this many of each set, spread (default: all)"
    )
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    args.command = shlex.join(["python", *sys.argv])
    if len(args.draws) < 2 or len(set(args.draws)) != len(args.draws):
        parser.error(f"--draws needs at least two distinct draws, got {args.draws}")
    unknown = sorted(set(args.types) - set(UNIT_TYPES))
    if unknown:
        parser.error(f"Unknown unit types {unknown}; known: {', '.join(UNIT_TYPES)}")
    model_path = args.model or args.demo / DEMO_ALIGNED_MODEL
    args.unit_map = args.unit_map or args.demo / DEMO_ALIGNED_MAP
    if not args.unit_map.is_file():
        parser.error(f"{args.unit_map} is missing (make demo, or ssah-peft score --model ... --out it)")
    unit_map = UnitMap.load(args.unit_map)  # a damaged map fails here, before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    sets_measured = curve_sets("task", args.limit, args.task_items)
    args.settings = measure_settings(sets_measured)
    settings = {**args.settings, "parts": args.parts}

    model, tokenizer = load(model_path, dtype=getattr(torch, args.dtype))
    unit_map.check_model(model)
    model.eval()
    unit_sets = {INTACT: {}, **draw_sets(unit_map, model, args.types, args.draws)}
    total_units = sum(sum(widths) for widths in unit_map.fingerprint["widths"].values())
    names = list(unit_sets)
    generated_prompts = [len(sets_measured.harmful), len(sets_measured.lookalike)]
    if args.generate_prompts:
        sizes = (len(load_builtin(n)) for n in ("harmful_eval", "overrefusal_eval"))
        generated_prompts = [min(args.generate_prompts, size) for size in sizes]
    points: dict[str, dict] = {}
    for name in names:
        point = stored_point(row_path(args.results, name), settings)
        if point is None and name == INTACT and args.baseline:
            baseline = stored_point(args.baseline, args.settings)
            point = None if baseline is None else {**baseline, "measures": settings, "reused_from": str(args.baseline)}
        if point is None:
            print(f"[unit_ablation] measuring with {name} zeroed", file=sys.stderr)
            start = time.perf_counter()
            with torch.no_grad(), ablate(model, unit_sets[name], parts=args.parts):
                point = {**measure_point(model, tokenizer, sets_measured), "measures": settings}
            point["wall_seconds"] = round(time.perf_counter() - start, 1)
        if args.generate and point.get("generation", {}).get("prompts") != generated_prompts:
            print(f"[unit_ablation] generating with {name} zeroed", file=sys.stderr)
            with torch.no_grad(), ablate(model, unit_sets[name], parts=args.parts):
                point["generation"] = generation_rates(model, tokenizer, args.limit, args.generate_prompts)
        point["units"] = count_units(unit_sets[name])
        path = row_path(args.results, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(point, indent=1) + "\n")
        points[name] = point
        write_results(args, names, points, total_units)
    return 0


if __name__ == "__main__":
    sys.exit(main())
