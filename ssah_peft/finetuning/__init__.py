"""Fine-tune a chat model on the user's own data without losing its refusals: ``ssah_peft.finetune(...)`` and
``ssah-peft finetune``.

The glue a user would otherwise write (score the model, classify its units, build the SSAH config, train, evaluate
safety before and after) as one job, one concept per module:

* :mod:`.data`: the user's JSONL/CSV/Parquet files (prompt/response columns or chat ``messages``) as records;
* :mod:`.options`: the job's options, their defaults and the evidence for them, and the method they select
  (:mod:`ssah_peft.training.methods`);
* :mod:`.job`: validation before anything is written, then scoring, evaluation, training on the training layer
  (:mod:`ssah_peft.training`: the response-only loss the demo trains with), the adapter;
* :mod:`.checkpoints`: the checkpoint a resumed job continues from, and the adapter saved without a half-written
  state;
* :mod:`.control`: ``--control random``, the same job trained on random units of the chosen units' counts;
* :mod:`.report`: before/after ASR, over-refusal and perplexity with 95% intervals, loss curve, costs.
"""

from __future__ import annotations

from dataclasses import fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Optional, Union

from .data import Examples, read_examples, read_prompts
from .job import FinetuneJob, FinetuneResult, RunRefused, check_run_dir
from .options import DEFAULT_LEARNING_RATES, DEFAULT_UNIT_TYPES, MODES, FinetuneOptions, method_for

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_UNIT_TYPES",
    "MODES",
    "Examples",
    "FinetuneJob",
    "FinetuneOptions",
    "FinetuneResult",
    "RunRefused",
    "check_run_dir",
    "finetune",
    "method_for",
    "read_examples",
    "read_prompts",
]


def finetune(
    model: str,
    data: str,
    out: Union[str, Path],
    *,
    callbacks: Optional[list[Any]] = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` into the run folder ``out``; returns the trained model, paths and report.

    ``options`` are the fields of :class:`FinetuneOptions` (``mode="protect"``, ``unit_types=("SCU", "CU")``,
    ``max_steps=...``, ``resume=True``, ...), with the same defaults and checks as ``ssah-peft finetune``'s
    options; ``callbacks`` are passed to the ``Trainer``. Every input is checked before anything is written
    (``TypeError`` for an unknown option; ``ValueError`` / ``OSError`` naming the problem).
    """
    known = {option.name for option in fields(FinetuneOptions)} - {"model", "data", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
            for name in unknown
            for close in [get_close_matches(name, known, n=1)]
        ]
        raise TypeError(f"finetune() got unknown options {', '.join(hints)}; the options are FinetuneOptions' fields")
    return FinetuneJob.prepare(FinetuneOptions(model=model, data=data, out=Path(out), **options)).run(callbacks)
