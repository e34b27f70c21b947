"""What a fine-tuning job reports: the data it trained on and what was left out or cut, safety and perplexity before
and after, with 95% intervals, the loss curve, the costs and the command; written as ``report.json``, ``report.md``
and ``loss_curve.png``.

A module of its own because the report is the job's answer to the user's question ("did my model keep its
refusals?"), and its numbers must be measured the same way before and after: :func:`evaluation` runs the same
prompts, judges and perplexity records on both models. Rates carry their 95% Wilson intervals
(:mod:`ssah_peft.evaluate.intervals`): the held-out sets are small, and a difference inside the intervals is noise.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from .._files import write_atomic, write_json
from .._version import __version__
from ..data import load_builtin
from ..evaluate import GenerationSettings, evaluate_safety, format_rate, perplexity, wilson_interval
from ..training import spread
from ..tuner.model_card import add_safety_table
from .data import Examples, TrainingSet, listing

REPORT_SCHEMA = "ssah-peft finetune report v1"


def evaluation(
    model: Any,
    tokenizer: Any,
    harmful: Optional[Sequence[Mapping[str, Any]]],
    perplexity_records: Sequence[Mapping[str, Any]],
    limit: Optional[int],
    max_new_tokens: int,
    show_progress: bool,
    max_length: Optional[int] = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """ASR on harmful prompts (``harmful``, else the built-in held-out set), over-refusal on the built-in benign
    sensitive-looking prompts, and perplexity of ``perplexity_records`` (their first ``max_length`` tokens, as
    training sees them); ``limit`` prompts/records per set, spread over the categories. Returns the result and the
    generations."""

    def cut(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return spread(records, limit) if limit else [dict(r) for r in records]

    harmful_rows = cut(harmful if harmful is not None else load_builtin("harmful_eval"))
    benign_rows = cut(load_builtin("overrefusal_eval"))
    settings = GenerationSettings(max_new_tokens=max_new_tokens, show_progress=show_progress)
    block, generations = evaluate_safety(model, tokenizer, harmful_rows, benign_rows, settings)
    harm, refusal = block["harmful"], block["overrefusal"]
    result: dict[str, Any] = {
        "asr": _rate(harm["attack_successes"], harm["n"], "built-in harmful_eval" if harmful is None else "given"),
        "overrefusal": _rate(refusal["refusals"], refusal["n"], "built-in overrefusal_eval"),
        "perplexity": None,
    }
    records = cut(perplexity_records)
    if records:
        result["perplexity"] = perplexity(model, tokenizer, records, show_progress=show_progress, max_length=max_length)
    return result, generations


def _rate(successes: int, n: int, dataset: str) -> dict[str, Any]:
    low, high = wilson_interval(successes, n)
    return {"dataset": dataset, "n": n, "count": successes, "rate": successes / n, "interval95": [low, high]}


def write_report(out: Optional[Path], **facts: Any) -> dict[str, Any]:
    """Build the report from the job's ``facts`` and, with ``out``, write its three files there."""
    o = facts["options"]
    model = facts["model"]
    adapter_file = out / "adapter" / "adapter_model.safetensors" if out is not None else None
    losses = loss_points(facts["log_history"])
    units = facts["units"]
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "ssah_peft_version": __version__,
        "command": o.command,
        "model": o.model,
        "data": {
            **data_facts(o, facts["train"], facts["training"], facts.get("safety_eval")),
            "perplexity_on": o.eval_data or ("held-out tenth of the training data" if facts["eval_examples"] else None),
        },
        "method": facts["method"].name,
        "mode": o.mode,
        "unit_types": list(o.types) if o.mode != "lora" else [],
        "units_chosen_by": facts["method"].units.name if facts["method"].units is not None else None,
        "units": sum(len(i) for blocks in units.values() for i in blocks.values()) if units else None,
        "settings": o.pinned(),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_bytes": adapter_file.stat().st_size if adapter_file is not None and adapter_file.is_file() else None,
        "steps": facts["steps"],
        "train_seconds": round(facts["train_seconds"], 2),
        "wall_seconds": round(facts["wall_seconds"], 2),
        "stage_seconds": facts.get("stage_seconds", {}),
        "loss_curve": [{"step": s, "loss": loss} for s, loss in losses],
        "before": facts["before"],
        "after": facts["after"],
        "control": facts.get("control"),
    }
    if out is not None:
        if losses:
            write_atomic(out / "loss_curve.png", _loss_png(losses, report["method"]))
        write_json(out / "report.json", report)
        write_atomic(out / "report.md", markdown(report).encode("utf-8"))
        if report["before"] is not None and report["after"] is not None and adapter_file.is_file():
            add_safety_table(adapter_file.parent, safety_table(report["before"], report["after"]))
    return report


def loss_points(log_history: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """The (step, training loss) points of a ``Trainer``'s log history."""
    return [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]


def data_facts(
    options: Any, train: Examples, training: TrainingSet, safety_eval: Optional[Examples] = None
) -> dict[str, Any]:
    """What became of the training data's records: read, left out (where, and why), truncated, trained; and of the
    harmful prompts of ``--safety-eval-data`` (``safety_eval``), which blank ones were left out."""
    safety = {}
    if safety_eval is not None:
        safety = {
            "safety_eval_prompts": len(safety_eval.records),
            "safety_eval_skipped_blank": len(safety_eval.blank),
            "safety_eval_skipped_blank_at": safety_eval.blank,
        }
    return {
        "train": options.data,
        "shape": train.shape,
        "examples_read": len(train.records) + len(train.blank),
        "skipped_blank": len(train.blank),
        "skipped_blank_at": train.blank,
        "held_out": len(train.records) - len(training.dataset) - len(training.skipped),
        "max_length": options.max_length,
        "truncated": len(training.truncated),
        "truncated_at": training.truncated,
        "skipped_truncated": len(training.skipped),
        "skipped_truncated_at": training.skipped,
        "examples_trained": len(training.dataset),
        **safety,
    }


def data_lines(data: Mapping[str, Any]) -> list[str]:
    """:func:`data_facts` as Markdown lines: every example left out or cut is counted and its first lines named."""
    lines = [
        f"Data `{data['train']}` ({data['shape']}): {data['examples_read']} examples read, "
        f"{data['examples_trained']} trained."
    ]
    if data["skipped_blank"]:
        lines.append(f"- {data['skipped_blank']} skipped, a turn of theirs blank: {listing(data['skipped_blank_at'])}")
    if data["held_out"]:
        lines.append(f"- {data['held_out']} held out for perplexity")
    length = f"--max-length {data['max_length']}"
    if data["truncated"]:
        lines.append(
            f"- {data['truncated']} trained with the end of their response cut by {length}: "
            + listing(data["truncated_at"])
        )
    if data["skipped_truncated"]:
        lines.append(
            f"- {data['skipped_truncated']} skipped, {length} leaving none of their response (--skip-truncated): "
            + listing(data["skipped_truncated_at"])
        )
    if data.get("safety_eval_skipped_blank"):
        lines.append(
            f"- harmful prompts of --safety-eval-data: {data['safety_eval_prompts']} evaluated, "
            f"{data['safety_eval_skipped_blank']} blank skipped: {listing(data['safety_eval_skipped_blank_at'])}"
        )
    return lines


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the data, the before/after table, the costs and the command."""
    lines = [
        f"# Fine-tuning report: {report['model']}",
        "",
        f"Method **{report['method']}** (mode {report['mode']}"
        + (
            f", units {' + '.join(report['unit_types']) or report['units_chosen_by']}: {report['units']:,}"
            if report["units"]
            else ""
        )
        + f"), {report['steps']} steps on {report['data']['examples_trained']} examples of "
        + f"`{report['data']['train']}`.",
        "",
        *data_lines(report["data"]),
        "",
    ]
    before, after = report["before"], report["after"]
    if before is None or after is None:
        lines += ["Evaluation was switched off (`--no-eval`).", ""]
    else:
        lines += [*safety_table(before, after), ""]
    if report.get("control") is not None:
        lines += [*control_lines(report), ""]
    size = report["adapter_bytes"]
    lines += [
        f"- trainable parameters: {report['trainable_parameters']:,}",
        f"- adapter size: {size / 2**20:.2f} MiB" if size is not None else "- adapter size: -",
        f"- training time: {report['train_seconds']:.1f} s; wall time: {report['wall_seconds']:.1f} s",
        "- loss curve: ![loss](loss_curve.png)" if report["loss_curve"] else "- loss curve: -",
        "",
        "Command:",
        "",
        "```",
        str(report["command"] or "(Python API)"),
        "```",
        "",
    ]
    return "\n".join(lines)


def safety_table(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The before/after table of the report, as Markdown lines (also added to the adapter's model card)."""
    lines = ["| measure | before | after |", "|---|---:|---:|"]
    for key, name in (("asr", "attack success rate ↓"), ("overrefusal", "over-refusal ↓")):
        b, a = before[key], after[key]
        lines.append(f"| {name} (n={b['n']}) | {format_rate(b['count'], b['n'])} | {format_rate(a['count'], a['n'])} |")
    if before["perplexity"] and after["perplexity"]:
        n = before["perplexity"]["texts"]
        lines.append(
            f"| perplexity ↓ ({n} texts) | {before['perplexity']['ppl']:.3f} | {after['perplexity']['ppl']:.3f} |"
        )
    return [
        *lines,
        "",
        "Rates are shown with their 95% Wilson interval; overlapping intervals are no evidence of a change.",
    ]


def control_lines(report: Mapping[str, Any]) -> list[str]:
    """The chosen units and their random control side by side (``--control random``), and a plain sentence on
    whether the choice mattered on this run: a difference counts only where the 95% intervals do not overlap, and
    one run of each is never called a test."""
    control = report["control"]
    chosen_name, control_name = f"chosen ({report['method']})", f"random, same counts ({control['method']})"
    lines = [
        "## Control: random units of the same per-layer and per-kind counts",
        "",
        f"`{control['adapter']}/` was trained with {control['units']:,} "
        f"{'frozen' if report['mode'] == 'protect' else 'trained'} units drawn at random ({control['units_drawn']}), "
        "with the same data, seed and settings.",
        "",
        f"| measure | {chosen_name} | {control_name} |",
        "|---|---:|---:|",
    ]
    after, control_after = report["after"], control["after"]
    apart = []
    if after is not None and control_after is not None:
        for key, name in (("asr", "attack success rate ↓"), ("overrefusal", "over-refusal ↓")):
            a, c = after[key], control_after[key]
            lines.append(
                f"| {name} (n={a['n']}) | {format_rate(a['count'], a['n'])} | {format_rate(c['count'], c['n'])} |"
            )
            (low_a, high_a), (low_c, high_c) = a["interval95"], c["interval95"]
            if high_a < low_c or high_c < low_a:
                apart.append(
                    f"{name.rstrip(' ↓')} {'lower' if a['rate'] < c['rate'] else 'higher'} with the chosen units"
                )
        if after["perplexity"] and control_after["perplexity"]:
            lines.append(
                f"| perplexity ↓ | {after['perplexity']['ppl']:.3f} | {control_after['perplexity']['ppl']:.3f} |"
            )
    final = [curve[-1]["loss"] if curve else None for curve in (report["loss_curve"], control["loss_curve"])]
    lines.append("| final training loss | " + " | ".join("-" if x is None else f"{x:.4f}" for x in final) + " |")
    lines += [
        f"| trainable parameters | {report['trainable_parameters']:,} | {control['trainable_parameters']:,} |",
        "",
    ]
    if after is None or control_after is None:
        verdict = "Evaluation was switched off (`--no-eval`), so only the training losses can be compared."
    elif apart:
        verdict = (
            "On this run the two differ beyond their 95% intervals: " + "; ".join(apart) + ". The choice of units "
            "may have mattered here."
        )
    else:
        verdict = (
            "On this run the chosen units and random units of the same counts cannot be told apart: the 95% "
            "intervals of each rate overlap, so the choice of units made no difference this run can show."
        )
    return [
        *lines,
        verdict + " One run of each is not a test: repeat with other `--seed` values before concluding either way.",
    ]


def _loss_png(losses: Sequence[tuple[int, float]], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([s for s, _ in losses], [loss for _, loss in losses], marker="." if len(losses) < 50 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (responses)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
