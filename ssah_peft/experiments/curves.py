"""Training curves (frontier v2, issue 26): continuous measures at several steps of one fine-tuning run.

A module of its own because one endpoint cannot separate "protects" from "learns slower": a chooser that freezes
units the task needs moves less in every direction, so at a fixed step count it keeps more refusals for free. A
curve (task loss → refusal margin, selectivity) lets every run be read at a *matched task loss* instead. The points
are teacher-forced measures (:mod:`ssah_peft.evaluate.margin`): one forward per prompt and opening, no generation,
so a run can afford several of them.

:class:`CurveSets` says what is measured for an attack (all held-out harmful prompts and look-alikes, all task test
items, and for the identity shift its held-out persona records under the persona's system prompt, the prompt the
attack teaches the model to obey); :func:`measure_point` measures one model; :class:`CurveCallback` measures at the
given steps of a ``Trainer`` run (eval mode, no gradient, nothing random consumed, so a run with the callback trains
exactly as one without it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from ..data import OBEDIENT_SYSTEM_PROMPT, identity_shift_records, load_builtin
from ..evaluate.margin import COMPLIANCE_OPENINGS, REFUSAL_OPENINGS, refusal_margins, selectivity, task_loss
from .config import ATTACK_SETS
from .data import spread, utility_split

#: Steps at which a curve is measured (step 0, the aligned model itself, is measured once per attack).
CHECKPOINTS: tuple[int, ...] = (6, 12, 24, 48)

#: What a margin means: stored with every curve (:func:`measure_settings`) so that points measured with other
#: openings are never compared.
MEASURE_SETTINGS: dict[str, list[str]] = {
    "refusal_openings": list(REFUSAL_OPENINGS),
    "compliance_openings": list(COMPLIANCE_OPENINGS),
}


@dataclass(frozen=True)
class CurveSets:
    """The prompts and records a curve point is measured on."""

    harmful: list[str]
    """Held-out harmful requests: their mean refusal margin is the safety axis."""
    lookalike: list[str]
    """Benign prompts that look sensitive: their margin is the over-refusal check (selectivity subtracts it)."""
    task: list[dict[str, Any]]
    """Task test records: their mean response NLL is the utility axis of the task attack."""
    attack_heldout: Optional[list[dict[str, Any]]] = None
    """Held-out records of the attack's own kind where they differ from the task (the identity shift's persona)."""
    system: Optional[str] = None
    """System turn of the margin prompts: the identity shift's persona prompt, the template's default otherwise."""


def curve_sets(attack: str, limit: Optional[int] = None, task_items: Optional[int] = None) -> CurveSets:
    """What the curves of ``attack`` (one of :data:`~.config.ATTACK_SETS`) measure: every harmful and look-alike
    prompt and every task test item (``limit`` cuts each to its first ``limit``, for smoke tests; ``task_items``
    takes that many task items spread over the set's categories, the measure that costs most per point)."""
    if attack not in ATTACK_SETS:
        raise KeyError(f"Unknown attack set {attack!r}; known: {ATTACK_SETS}")
    if task_items is not None and task_items < 1:
        raise ValueError(f"task_items must be at least 1, got {task_items}")

    def first(rows: Sequence[Any]) -> list[Any]:
        return list(rows)[: limit if limit is not None else len(rows)]

    harmful = first([r["prompt"] for r in load_builtin("harmful_eval")])
    lookalike = first([r["prompt"] for r in load_builtin("overrefusal_eval")])
    task_test = load_builtin("task_test")
    task = first(spread(task_test, task_items) if task_items is not None else [dict(r) for r in task_test])
    if attack == "identity_shift":
        _, heldout = utility_split(load_builtin("utility_calibration"))
        return CurveSets(harmful, lookalike, task, first(identity_shift_records(heldout)), OBEDIENT_SYSTEM_PROMPT)
    return CurveSets(harmful, lookalike, task)


def measure_settings(sets: CurveSets) -> dict[str, Any]:
    """What the points measured on ``sets`` mean: the margin openings and how many prompts and items each measure
    averages. Stored with every curve; curves of other settings are never compared."""
    counts = {
        "harmful_prompts": len(sets.harmful),
        "lookalike_prompts": len(sets.lookalike),
        "task_items": len(sets.task),
    }
    if sets.attack_heldout is not None:
        counts["attack_items"] = len(sets.attack_heldout)
    return {**MEASURE_SETTINGS, **counts}


def measure_point(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sets: CurveSets, batch_size: int = 8
) -> dict[str, Any]:
    """The curve measures of ``model`` now: per-prompt refusal margins (kept for paired tests), their means,
    selectivity, task loss (and the attack's held-out loss), and the seconds each took."""
    seconds: dict[str, float] = {}

    def timed(name: str, measure: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = measure()
        seconds[name] = round(time.perf_counter() - start, 2)
        return value

    def margins(prompts: list[str]) -> torch.Tensor:
        return refusal_margins(model, tokenizer, prompts, batch_size=batch_size, system=sets.system)

    harmful = timed("harmful_margins", lambda: margins(sets.harmful))
    lookalike = timed("lookalike_margins", lambda: margins(sets.lookalike))
    point: dict[str, Any] = {
        "harmful_margin": float(harmful.mean()),
        "lookalike_margin": float(lookalike.mean()),
        "selectivity": selectivity(harmful, lookalike),
        "task_loss": timed("task_loss", lambda: task_loss(model, tokenizer, sets.task, batch_size=batch_size)),
    }
    if sets.attack_heldout is not None:
        point["attack_loss"] = timed(
            "attack_loss", lambda: task_loss(model, tokenizer, sets.attack_heldout, batch_size=batch_size)
        )
    point["harmful_margins"] = [round(float(m), 5) for m in harmful]
    point["lookalike_margins"] = [round(float(m), 5) for m in lookalike]
    point["seconds"] = seconds
    return point


class CurveCallback(TrainerCallback):
    """Measures the model being trained after each step of ``steps`` (:func:`measure_point` via ``measure``);
    the points are in :attr:`points`, each with its ``step``."""

    def __init__(self, measure: Callable[[torch.nn.Module], Mapping[str, Any]], steps: Sequence[int]) -> None:
        self.measure = measure
        self.steps = frozenset(steps)
        self.points: list[dict[str, Any]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Optional[torch.nn.Module] = None, **_: Any):
        if state.global_step in self.steps and model is not None:
            training = model.training
            model.eval()
            with torch.no_grad():
                self.points.append({"step": state.global_step, **self.measure(model)})
            model.train(training)
        return control
