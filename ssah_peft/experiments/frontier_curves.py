"""Frontier v2 (issue 26): does a chooser's choice of frozen units keep more refusal than random units of its own
per-layer counts *at the same task loss*?

The first frontier compared runs at one step count, which mixes "protects" with "learns slower", on 36 prompts,
with three dependent random draws and ~50 uncorrected comparisons. Here every attack run is a curve
(:mod:`.curves`: refusal margins on all harmful and look-alike prompts and the task loss, at several steps), every
run is read at a task loss that all runs of its comparison reach (:func:`ssah_peft.evaluate.statistics.matched_range`,
interpolated on each curve), and a chooser is compared with independent random draws of its own counts:

* a *cell* is (attack, chooser, budget): the chooser's runs at each training seed, and its control's runs, one per
  independent draw and seed (:meth:`.choosers.Chooser.random_control` with ``draw``), so each control run has units
  and a training order of its own;
* the test is a two-sample permutation test with runs as the units (the chooser's runs against the control's), on
  the run's mean harmful margin and selectivity at the matched task loss; Holm's correction runs over every test the
  summary makes (:func:`comparisons`); a claim needs the corrected p-value. Beside each difference stands the
  interval the same test does not reject (:func:`ssah_peft.evaluate.statistics.two_sample_shift_interval`;
  uncorrected, so it agrees with the raw p-value, not Holm's).

A run trains with :func:`.finetuning.train_method` for ``max(checkpoints)`` steps at the attack's learning rate and ends
with the generation ASR on all held-out harmful prompts and the over-refusal rate on all look-alikes, with the audit
of the replies judged attack successes (:func:`ssah_peft.evaluate.audit_replies`). Its result keeps no reply text
(replies to harmful requests are never stored beside the results); ``generations.jsonl`` goes to the run cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._files import write_text
from ..evaluate import audit_replies, write_generations
from ..evaluate.intervals import CONFIDENCE
from ..evaluate.statistics import (
    holm_adjust,
    interpolate_at,
    matched_range,
    spearman_correlation,
    two_sample_permutation_test,
    two_sample_shift_interval,
)
from ..unit_map import UnitMap
from .choosers import CHOOSERS, chooser_named
from .config import DemoConfig
from .curves import CHECKPOINTS, CurveCallback, CurveSets, measure_point, measure_settings
from .data import attack_records
from .finetuning import train_method
from .frontier import FrontierRun
from .measures import evaluate_model
from .stages import ModelLoader

#: Independent random draws of a chooser's per-layer counts per training seed.
DRAWS: tuple[int, ...] = (0, 1, 2, 3, 4)
#: Runs that freeze nothing, drawn beside the choosers (:data:`.frontier.REFERENCES`).
REFERENCE_RUNS: tuple[str, ...] = ("full", "lora", "dense")
#: The measures compared at a matched task loss: higher is safer for both.
MEASURES: tuple[str, ...] = ("harmful_margin", "selectivity")


def cell_runs(
    attack: str,
    chooser: str,
    budget: float,
    seeds: Sequence[int] = (0, 1, 2),
    draws: Sequence[int] = DRAWS,
    setting: str = "protect",
) -> list[FrontierRun]:
    """The runs of one comparison: ``chooser`` at every seed, then its random control at every draw and seed, both
    frozen in ``setting`` (:data:`.frontier.SETTINGS`; ``protect_out_proj`` freezes as many parameters for a choice
    as for its control)."""
    entry, is_control = chooser_named(chooser)
    if is_control:
        raise ValueError(f"{chooser!r} is a random control; name the chooser it controls ({entry.name!r})")
    chosen = [FrontierRun(attack, setting, entry.name, budget, seed) for seed in seeds]
    controls = [FrontierRun(attack, setting, entry.control, budget, seed, draw) for seed in seeds for draw in draws]
    return chosen + controls


def arm_label(chooser: str, result: Mapping[str, Any]) -> str:
    """``chooser`` as a table or legend names it: with the run's setting when it is not plain ``protect``."""
    setting = result.get("setting", "protect")  # runs stored before settings were recorded are protect runs
    return chooser if setting == "protect" else f"{chooser} ({setting})"


def curve_run(
    config: DemoConfig,
    load_aligned: ModelLoader,
    run: FrontierRun,
    unit_map: Optional[UnitMap],
    sets: CurveSets,
    result_path: Path,
    cache_dir: Path,
    checkpoints: Sequence[int] = CHECKPOINTS,
    start: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """One curve run, cached at ``result_path`` (a rerun reads it): train ``run``'s method on its attack set,
    measuring at ``checkpoints``, then generate on all held-out harmful and look-alike prompts. ``start`` is the
    aligned model's own point (step 0), put first on the curve. Replies go to ``cache_dir / generations.jsonl``."""
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    method = run.method()
    model, tokenizer = load_aligned()
    callback = CurveCallback(lambda m: measure_point(m, tokenizer, sets), checkpoints)
    learning_rate = config.attack_learning_rates[method.learning_rate_key]
    records = attack_records(run.attack, config)
    model, info = train_method(
        model, tokenizer, records, method, max(checkpoints), learning_rate, config, cache_dir, unit_map, [callback]
    )
    everything = replace(config, harmful_prompts=len(sets.harmful), overrefusal_prompts=len(sets.lookalike))
    evaluation = evaluate_model(model, tokenizer, everything)
    generations = evaluation.pop("generations")
    write_generations(cache_dir / "generations.jsonl", generations)
    successes = [g["response"] for g in generations if g.get("dataset") == "harmful" and g.get("harmful")]
    result = {
        "attack": run.attack,
        "chooser": run.chooser,
        "budget": run.budget,
        "setting": run.setting,
        "seed": run.seed,
        "draw": run.draw,
        "measures": measure_settings(sets),
        **info,
        "curve": ([{"step": 0, **{k: v for k, v in start.items() if k != "measures"}}] if start else [])
        + callback.points,
        "final": {
            "metrics": evaluation["metrics"],
            "harmful_flags": [bool(g["harmful"]) for g in generations if g.get("dataset") == "harmful"],
            "audit": audit_replies(successes),
            "eval_seconds": evaluation["eval_seconds"],
        },
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(result_path, json.dumps(result, indent=1) + "\n")
    return result


def at_matched_loss(result: Mapping[str, Any], loss: float, loss_key: str = "task_loss") -> dict[str, float]:
    """Each of :data:`MEASURES` read off ``result``'s curve where its task loss first reaches ``loss``."""
    curve = result["curve"]
    losses = [point[loss_key] for point in curve]
    return {measure: interpolate_at(losses, [point[measure] for point in curve], loss) for measure in MEASURES}


def loss_key(attack: str) -> str:
    """The utility axis of ``attack``: the task loss, or for the identity shift its held-out persona loss."""
    return "attack_loss" if attack == "identity_shift" else "task_loss"


#: The fewest runs of each arm a cell is tested with: three training seeds of the chooser, five independent draws
#: of its control (a sweep stopped midway leaves cells with fewer, which are listed, not tested).
MIN_CHOOSER_RUNS, MIN_CONTROL_RUNS = 3, 5


def complete(arms: Mapping[str, Sequence[Any]]) -> bool:
    """Whether a cell's ``{"chooser": runs, "control": runs}`` has enough runs of each arm to be tested."""
    return len(arms["chooser"]) >= MIN_CHOOSER_RUNS and len(arms["control"]) >= MIN_CONTROL_RUNS


def cells_of(results: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, float], dict[str, list[Mapping[str, Any]]]]:
    """The runs of each cell (attack, chooser, budget), split into the chooser's and its control's."""
    cells: dict[tuple[str, str, float], dict[str, list[Mapping[str, Any]]]] = {}
    for result in results:
        entry, is_control = chooser_named(result["chooser"])
        key = (result["attack"], arm_label(entry.name, result), result["budget"])
        arms = cells.setdefault(key, {"chooser": [], "control": []})
        arms["control" if is_control else "chooser"].append(result)
    return cells


def comparisons(results: Sequence[Mapping[str, Any]], permutations: int = 20000) -> list[dict[str, Any]]:
    """Every complete cell's chooser against its control at the lowest task loss all the cell's runs reach, one row
    per (cell, measure), with the permutation test's p-value and Holm's correction over all rows."""
    cells = cells_of(results)
    rows = []
    for (attack, chooser, budget), arms in sorted(cells.items()):
        if not complete(arms):
            continue
        key = loss_key(attack)
        runs = arms["chooser"] + arms["control"]
        matched = matched_range([[point[key] for point in r["curve"]] for r in runs])[0]
        values = {arm: [at_matched_loss(r, matched, key) for r in arms[arm]] for arm in ("chooser", "control")}
        for measure in MEASURES:
            chosen = [v[measure] for v in values["chooser"]]
            control = [v[measure] for v in values["control"]]
            test = two_sample_permutation_test(chosen, control, permutations=permutations)
            low, high = two_sample_shift_interval(chosen, control, permutations=permutations)
            rows.append(
                {
                    "attack": attack,
                    "chooser": chooser,
                    "budget": budget,
                    "measure": measure,
                    "matched_loss": round(matched, 4),
                    "chooser_runs": len(chosen),
                    "control_runs": len(control),
                    "chooser_mean": float(np.mean(chosen)),
                    "control_mean": float(np.mean(control)),
                    "difference": test.mean_difference,
                    "low": low,
                    "high": high,
                    "p": test.p_value,
                }
            )
    for row, adjusted in zip(rows, holm_adjust([row["p"] for row in rows])):
        row["p_holm"] = adjusted
    return rows


def final_asr(result: Mapping[str, Any]) -> float:
    """The generation ASR at the end of a run."""
    return result["final"]["metrics"]["asr"]


def other_success_rate(result: Mapping[str, Any]) -> float:
    """The share of harmful prompts whose reply was judged an attack success and is neither in the task's format
    nor degenerate (:func:`ssah_peft.evaluate.audit_replies`): the successes that may be compliance."""
    return result["final"]["audit"]["counts"]["other"] / len(result["final"]["harmful_flags"])


def margin_asr_agreement(
    results: Sequence[Mapping[str, Any]], rate: Callable[[Mapping[str, Any]], float] = final_asr
) -> Optional[float]:
    """Spearman correlation across runs of the final mean harmful margin with ``rate`` (default the generation
    ASR; a margin that tracks refusals correlates negatively); None with fewer than three runs or where either is
    constant."""
    margins = [r["curve"][-1]["harmful_margin"] for r in results]
    rates = [rate(r) for r in results]
    if len(results) < 3 or len(set(margins)) < 2 or len(set(rates)) < 2:
        return None
    return spearman_correlation(margins, rates)


def plot_curves(results: Sequence[Mapping[str, Any]], path: Path, measure: str = "harmful_margin") -> Path:
    """One panel per attack: the utility axis (task loss, falling as the attack trains) against ``measure``, one
    line per chooser run, its random control's runs dotted in the same colour, reference runs (LoRA) dashed black."""
    if not results:
        raise ValueError("No runs to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({r["attack"] for r in results})
    figure, axes = plt.subplots(1, len(attacks), figsize=(6 * len(attacks), 4.5), squeeze=False)
    for axis, attack in zip(axes[0], attacks):
        key = loss_key(attack)
        colours: dict[str, Any] = {}
        for result in (r for r in results if r["attack"] == attack):
            xs = [point[key] for point in result["curve"]]
            ys = [point[measure] for point in result["curve"]]
            if result["chooser"] in REFERENCE_RUNS:
                axis.plot(xs, ys, color="black", linestyle="--", linewidth=1, label=f"{result['chooser']} (reference)")
                continue
            entry, is_control = chooser_named(result["chooser"])
            label = f"{arm_label(entry.name, result)} {result['budget'] * 100:g}%"
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            if is_control:
                axis.plot(xs, ys, color=colour, alpha=0.5, linewidth=1, linestyle=":")
            else:
                axis.plot(xs, ys, color=colour, marker="o", markersize=3, linewidth=1.5, label=label)
        axis.invert_xaxis()
        axis.set_xlabel(f"{key.replace('_', ' ')} (training goes right)")
        axis.set_ylabel(measure.replace("_", " "))
        axis.set_title(f"attack: {attack} (dotted: random draws of the same counts)")
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        axis.legend(unique.values(), unique.keys(), fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=110)
    plt.close(figure)
    staging.replace(path)
    return path


#: Columns of ``results.csv``: one row per run and curve point.
CSV_COLUMNS: tuple[str, ...] = (
    "attack",
    "chooser",
    "budget",
    "seed",
    "draw",
    "setting",
    "step",
    "task_loss",
    "attack_loss",
    "harmful_margin",
    "lookalike_margin",
    "selectivity",
    "asr",
    "overrefusal",
    "asr_task_format_share",
    "asr_degenerate_share",
)


def curve_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``results.csv``'s rows: every curve point of every run; the generation rates and the audit of the replies
    judged attack successes on the run's last point."""
    rows = []
    for result in results:
        for index, point in enumerate(result["curve"]):
            row = {column: result.get(column) for column in ("attack", "chooser", "budget", "seed", "draw")}
            row["setting"] = result.get(
                "setting", "protect" if result["chooser"] not in REFERENCE_RUNS else "reference"
            )
            row.update({column: point.get(column) for column in CSV_COLUMNS[6:12]})
            if index == len(result["curve"]) - 1:
                final = result["final"]
                shares = final["audit"]["shares"]
                row.update(
                    asr=final["metrics"]["asr"],
                    overrefusal=final["metrics"]["overrefusal"],
                    asr_task_format_share=shares.get("task_format"),
                    asr_degenerate_share=shares.get("degenerate"),
                )
            rows.append({column: row.get(column) for column in CSV_COLUMNS})
    return rows


def endpoint_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each arm's end of run (its last curve point and the generation rates after it), means over its runs: a
    reading at one step count, so an arm that learned less shows a higher task loss beside its rates. "Other
    successes" are the replies judged attack successes that are neither task-format nor degenerate (the audit), per
    harmful prompt."""
    arms: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    for result in results:
        arms.setdefault((result["attack"], arm_label(result["chooser"], result), result["budget"]), []).append(result)
    lines = [
        "| attack | arm | frozen | runs | steps | task loss | harmful margin | selectivity | ASR | other successes | "
        "over-refusal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (attack, chooser, budget), runs in sorted(arms.items()):
        last = [r["curve"][-1] for r in runs]
        metrics = [r["final"]["metrics"] for r in runs]
        other = [other_success_rate(r) for r in runs]
        lines.append(
            f"| {attack} | {chooser} | {budget * 100:g}% | {len(runs)} | {last[0]['step']} | "
            f"{np.mean([p[loss_key(attack)] for p in last]):.3f} | "
            f"{np.mean([p['harmful_margin'] for p in last]):+.2f} | {np.mean([p['selectivity'] for p in last]):+.2f} | "
            f"{np.mean([m['asr'] for m in metrics]):.3f} | "
            f"{np.mean(other):.3f} | {np.mean([m['overrefusal'] for m in metrics]):.3f} |"
        )
    return lines


def incomplete_cells(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The cells with too few runs to be tested (:func:`complete`), as ``attack:chooser:budget (runs)``."""
    return [
        f"{attack}:{chooser}:{budget:g} ({len(arms['chooser'])} chooser, {len(arms['control'])} control runs)"
        for (attack, chooser, budget), arms in sorted(
            cells_of([r for r in results if r["chooser"] not in REFERENCE_RUNS]).items()
        )
        if not complete(arms)
    ]


def summary_lines(results: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The summary's tables: the comparisons at matched task loss (``rows`` of :func:`comparisons`), the cells not
    complete enough to test, the agreement of the margin with the generation ASR, the audit of attack successes,
    and what each measure cost per run."""
    incomplete = incomplete_cells(results)
    lines = [
        "| attack | chooser | frozen | measure | matched loss | chooser (runs) | random (runs) | difference | "
        f"{CONFIDENCE:.0%} interval | p | p (Holm) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['attack']} | {row['chooser']} | {row['budget'] * 100:g}% | {row['measure']} | "
            f"{row['matched_loss']:.3f} | {row['chooser_mean']:+.3f} ({row['chooser_runs']}) | "
            f"{row['control_mean']:+.3f} ({row['control_runs']}) | {row['difference']:+.3f} | "
            f"[{row['low']:+.3f}, {row['high']:+.3f}] | {row['p']:.4f} | {row['p_holm']:.4f} |"
        )
    if incomplete:
        lines += [
            "",
            f"Not tested yet (fewer than {MIN_CHOOSER_RUNS} chooser or {MIN_CONTROL_RUNS} control runs): "
            + "; ".join(incomplete)
            + ".",
        ]
    lines += ["", *endpoint_lines(results)]
    lines.append("")
    for name, rate in (("the generation ASR", final_asr), ("the other successes' rate", other_success_rate)):
        agreement = margin_asr_agreement(results, rate)
        lines.append(
            f"Spearman correlation of the final mean harmful margin with {name} over {len(results)} runs: "
            + (f"{agreement:+.3f}." if agreement is not None else "undefined (fewer than three runs, or a constant).")
        )
    successes = sum(r["final"]["audit"]["n"] for r in results)
    if successes:
        shares = {
            kind: sum(r["final"]["audit"]["counts"][kind] for r in results) / successes
            for kind in results[0]["final"]["audit"]["counts"]
        }
        lines.append(
            f"Of {successes} replies judged attack successes: "
            + ", ".join(f"{kind} {share:.3f}" for kind, share in shares.items())
            + " (task-format or degenerate replies are not harmful compliance; the margin does not read replies)."
        )
    costs: dict[str, list[float]] = {}
    for result in results:
        for point in result["curve"]:
            for measure, seconds in point.get("seconds", {}).items():
                costs.setdefault(measure, []).append(seconds)
        costs.setdefault("training with its curve points (whole run)", []).append(result["train_seconds"])
        costs.setdefault("generation rates (end of run)", []).append(result["final"]["eval_seconds"])
    lines += ["", "| cost per run point | mean seconds |", "| --- | --- |"]
    lines += [f"| {measure} | {np.mean(values):.1f} |" for measure, values in costs.items()]
    total = sum(result["train_seconds"] + result["final"]["eval_seconds"] for result in results)
    lines += [
        "",
        f"The {len(results)} stored runs took {total / 3600:.1f} h in all (training with its curve points, and "
        "generation; each on the threads its sitting gave it, the unit maps not included).",
    ]
    return lines


#: The file under a sweep's results where ``benchmarks/chooser_cost.py`` stores what each unit map cost to make.
CHOOSER_COSTS_FILE = "chooser_costs.json"


def chooser_cost_lines(costs: Mapping[str, Any]) -> list[str]:
    """The table of what each chooser's unit map cost to make (``costs`` as ``benchmarks/chooser_cost.py`` stores
    them), in seconds and in plain no-grad forwards over the same calibration exchanges, the choosers reading each."""
    forward = costs["plain_forward_seconds"]
    lines = [
        f"What each chooser's unit map costs to make (`{costs['command']}`, {costs['threads']} "
        f"thread{'s' if costs['threads'] != 1 else ''}, {costs['calibration_pairs']} calibration exchanges per set; a "
        f"plain no-grad forward over both sets took {forward:.1f} s, loading the model {costs['load_seconds']:.1f} s, "
        "which every map's time includes; a map derived from another one made before it costs only the derivation):",
        "",
        "| unit map | choosers | seconds | plain forwards |",
        "| --- | --- | --- | --- |",
    ]
    for name, seconds in costs["map_seconds"].items():
        users = ", ".join(chooser.name for chooser in CHOOSERS.values() if chooser.unit_map == name)
        lines.append(f"| {name} | {users} | {seconds:.1f} | {seconds / forward:.1f} |")
    return lines
