"""What a fine-tuning job reports: safety and perplexity before and after, with 95% intervals, the loss curve, the
costs and the command; written as ``report.json``, ``report.md`` and ``loss_curve.png``.

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
from ..experiments.data import spread

REPORT_SCHEMA = "ssah-peft finetune report v1"


def evaluation(
    model: Any,
    tokenizer: Any,
    harmful: Optional[Sequence[Mapping[str, Any]]],
    perplexity_records: Sequence[Mapping[str, Any]],
    limit: Optional[int],
    max_new_tokens: int,
    show_progress: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """ASR on harmful prompts (``harmful``, else the built-in held-out set), over-refusal on the built-in benign
    sensitive-looking prompts, and perplexity of ``perplexity_records``; ``limit`` prompts/records per set, spread
    over the categories. Returns the result and the generations."""

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
        result["perplexity"] = perplexity(model, tokenizer, records, show_progress=show_progress)
    return result, generations


def _rate(successes: int, n: int, dataset: str) -> dict[str, Any]:
    low, high = wilson_interval(successes, n)
    return {"dataset": dataset, "n": n, "count": successes, "rate": successes / n, "interval95": [low, high]}


def write_report(out: Optional[Path], **facts: Any) -> dict[str, Any]:
    """Build the report from the job's ``facts`` and, with ``out``, write its three files there."""
    o = facts["options"]
    model = facts["model"]
    adapter_file = out / "adapter" / "adapter_model.safetensors" if out is not None else None
    losses = [(e["step"], e["loss"]) for e in facts["log_history"] if "loss" in e and "step" in e]
    units = facts["units"]
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "ssah_peft_version": __version__,
        "command": o.command,
        "model": o.model,
        "data": {
            "train": o.data,
            "shape": facts["train"].shape,
            "examples_read": len(facts["train"].records),
            "skipped_blank": facts["train"].skipped_blank,
            "examples_trained": facts["trained_examples"],
            "perplexity_on": o.eval_data or ("held-out tenth of the training data" if facts["eval_examples"] else None),
        },
        "method": facts["method"].name,
        "mode": o.mode,
        "unit_types": list(o.types) if o.mode != "lora" else [],
        "units": sum(len(i) for blocks in units.values() for i in blocks.values()) if units else None,
        "settings": o.pinned(),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_bytes": adapter_file.stat().st_size if adapter_file is not None and adapter_file.is_file() else None,
        "steps": facts["steps"],
        "train_seconds": round(facts["train_seconds"], 2),
        "wall_seconds": round(facts["wall_seconds"], 2),
        "loss_curve": [{"step": s, "loss": loss} for s, loss in losses],
        "before": facts["before"],
        "after": facts["after"],
    }
    if out is not None:
        if losses:
            write_atomic(out / "loss_curve.png", _loss_png(losses, report["method"]))
        write_json(out / "report.json", report)
        write_atomic(out / "report.md", markdown(report).encode("utf-8"))
    return report


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the before/after table, the costs and the command."""
    lines = [
        f"# Fine-tuning report: {report['model']}",
        "",
        f"Method **{report['method']}** (mode {report['mode']}"
        + (f", units {' + '.join(report['unit_types'])}: {report['units']:,}" if report["unit_types"] else "")
        + f"), {report['steps']} steps on {report['data']['examples_trained']} examples of "
        + f"`{report['data']['train']}`.",
        "",
    ]
    before, after = report["before"], report["after"]
    if before is None or after is None:
        lines += ["Evaluation was switched off (`--no-eval`).", ""]
    else:
        lines += ["| measure | before | after |", "|---|---:|---:|"]
        for key, name in (("asr", "attack success rate ↓"), ("overrefusal", "over-refusal ↓")):
            b, a = before[key], after[key]
            lines.append(
                f"| {name} (n={b['n']}) | {format_rate(b['count'], b['n'])} | {format_rate(a['count'], a['n'])} |"
            )
        if before["perplexity"] and after["perplexity"]:
            n = before["perplexity"]["texts"]
            lines.append(
                f"| perplexity ↓ ({n} texts) | {before['perplexity']['ppl']:.3f} | {after['perplexity']['ppl']:.3f} |"
            )
        lines += [
            "",
            "Rates are shown with their 95% Wilson interval; overlapping intervals are no evidence of a change.",
            "",
        ]
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
