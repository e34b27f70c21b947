"""The evaluation report and the files it is written to: one place for the format readers depend on.

``report.json`` is read back by people, by the CLI's checks (``REPORT_SCHEMA``) and by the benchmarks, and
``generations.jsonl`` is written both by :func:`write_report` and by the demo's result cache; keeping the schema,
the Markdown summary and both writers here means a change to the format is made once.

Report schema (``report.json``, built by :func:`ssah_peft.evaluate.run_evaluation`; absent suites are omitted)::

    {
      "schema": "ssah-peft/eval-report/v1",
      "created": "2025-01-01T12:00:00+00:00",       # UTC, ISO 8601
      "model": "smollm2-135m-instruct",            # name or path given
      "adapter": null,                             # adapter path, if any
      "suites": ["safety", "utility"],
      "settings": {"max_new_tokens": 64, "batch_size": 16, "system_prompt": null, "limit": null,
                   "harm_judge": "keywords", "refusal_judge": "keywords"},
      "environment": {"device": "cpu", "dtype": "float32", "torch": "...", "transformers": "...",
                      "peft": "...", "ssah_peft": "..."},
      "safety": {
        "harmful": {"dataset": "harmful_eval", "n": 108, "attack_successes": 90, "asr": 0.833,
                    "by_category": {"<category>": {"n": 9, "attack_successes": 8, "asr": 0.889}, ...},
                    "seconds": 61.2},
        "overrefusal": {"dataset": "overrefusal_eval", "n": 55, "refusals": 2, "rate": 0.036,
                        "by_category": {"<category>": {"n": 22, "refusals": 1, "rate": 0.045}, ...},
                        "seconds": 30.5}
      },
      "utility": {
        "task": {"dataset": "task_test", "n": 250, "correct": 40, "accuracy": 0.16, "seconds": 80.1},
        "perplexity": {"<dataset>": {"texts": 155, "tokens": 4100, "mean_nll": 2.1, "ppl": 8.2,
                                     "seconds": 5.0}, ...}
      },
      "seconds": 180.0                              # whole run, generation and judging included
    }

``generations.jsonl`` holds one object per generated response: ``dataset``, ``prompt``, ``category``,
``response`` and the verdict (``harmful``, ``refused`` or ``correct`` with ``answer`` and ``extracted``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import torch

from .._files import write_json, write_text
from .._version import __version__

REPORT_SCHEMA = "ssah-peft/eval-report/v1"


def environment(model: torch.nn.Module) -> dict[str, str]:
    """The report's ``environment`` block: where the model ran and the versions of the libraries involved."""
    import peft
    import transformers

    parameter = next(model.parameters())
    return {
        "device": str(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "ssah_peft": __version__,
    }


def report_markdown(report: Mapping[str, Any]) -> str:
    """A short Markdown table of a report's headline figures."""
    adapter = f" + adapter `{report['adapter']}`" if report.get("adapter") else ""
    lines = [f"**{report['model']}**{adapter}", "", "| suite | metric | value | n |", "|---|---|---:|---:|"]
    safety, utility = report.get("safety"), report.get("utility")
    if safety:
        harmful, over = safety["harmful"], safety["overrefusal"]
        judge = report["settings"]["harm_judge"]
        lines.append(
            f"| safety | attack success rate ({harmful['dataset']}, {judge}) | {harmful['asr']:.3f} | {harmful['n']} |"
        )
        lines.append(f"| safety | over-refusal rate ({over['dataset']}) | {over['rate']:.3f} | {over['n']} |")
    if utility:
        task = utility["task"]
        lines.append(f"| utility | exact-match accuracy ({task['dataset']}) | {task['accuracy']:.3f} | {task['n']} |")
        for name, result in utility["perplexity"].items():
            lines.append(
                f"| utility | perplexity ({name} responses) | {result['ppl']:.2f} | {result['tokens']} tokens |"
            )
    lines.append("")
    lines.append(
        f"{report['seconds']:.1f} s, max_new_tokens={report['settings']['max_new_tokens']}, "
        f"batch_size={report['settings']['batch_size']}"
    )
    return "\n".join(lines)


def write_generations(path: Union[str, Path], records: Iterable[Mapping[str, Any]]) -> Path:
    """Write generation records to ``path`` as JSON lines (``generations.jsonl``, one object per response, UTF-8),
    atomically (a reader never sees half a file); returns the path."""
    return write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_report(
    report: Mapping[str, Any], generations: Iterable[Mapping[str, Any]], out_dir: Union[str, Path]
) -> Path:
    """Write ``report.json``, ``report.md`` and ``generations.jsonl`` into ``out_dir``, each atomically; returns the
    folder. ``report.json`` first: it is what identifies the other two as ours (:mod:`ssah_peft.cli.paths`), so a
    write that fails part-way leaves a folder the next run accepts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report, ensure_ascii=False)
    write_text(out / "report.md", report_markdown(report) + "\n")
    write_generations(out / "generations.jsonl", generations)
    return out
