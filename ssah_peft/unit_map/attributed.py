"""Unit maps of one attribution score (:mod:`ssah_peft.scoring.attribution`): the refusal margin's attribution
(``margin_grad``), the fine-tuning data's conflict with it (``conflict``) and the refusal direction's writes
(``refusal_direction``), each from a model, its tokenizer and prompts.

A module of its own because the frontier's choosers (:mod:`ssah_peft.experiments.chooser_maps`) and
``ssah-peft finetune --chooser`` make these maps the same way: one score per unit kept as a map whose utility scores
are zero (:func:`one_score_map`), so that ``choose_units(rule="difference")`` ranks units by the score and every
chooser takes its budget by the same rule as SNIP's and Wanda's I_S − I_U. :data:`ATTRIBUTION_MAPS` names them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import nn

from ..evaluate.margin import margin_inputs, refusal_margin_terms
from ..scoring import UnitScores, build_calibration_batches
from ..scoring.attribution import conflict_scores, margin_attribution_scores, refusal_direction_scores
from .classification import UnitMap


def one_score_map(scores: UnitScores, **classification: Any) -> UnitMap:
    """A unit map ranking units by one score: ``scores`` as I_S, zero as I_U, so that D = I_S − I_U is the score
    (the types are classified as any map's, by ``classification``, the keyword arguments of
    :meth:`UnitMap.from_scores`; no chooser of one score reads them)."""
    zero = {kind: tuple(torch.zeros_like(t) for t in per_layer) for kind, per_layer in scores.scores.items()}
    utility = replace(scores, scores=zero, metadata={"note": "zero: the map ranks units by one score"})
    return UnitMap.from_scores(scores, utility, **classification)


def _margin_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int = 8) -> list[Any]:
    return margin_inputs(tokenizer, list(prompts), batch_size=batch_size)


def margin_grad_map(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Mapping[str, Any]],
    utility: Sequence[Mapping[str, Any]],
    *,
    max_length: int = 512,
    show_progress: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
    classification: Optional[Mapping[str, Any]] = None,
) -> UnitMap:
    """The map of :func:`~ssah_peft.scoring.attribution.margin_attribution_scores`: the refusal margin's
    attribution on the ``harmful`` records' prompts minus that on the ``utility`` records' prompts."""
    harmful_batches, utility_batches = (  # one prompt per batch: each backward runs through its own rows only
        _margin_batches(tokenizer, [record["prompt"] for record in records], batch_size=1)
        for records in (harmful, utility)
    )
    scores = margin_attribution_scores(
        model,
        harmful_batches,
        utility_batches,
        refusal_margin_terms,
        show_progress_bar=show_progress,
        metadata=metadata,
    )
    return one_score_map(scores, **dict(classification or {}))


def conflict_map(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Mapping[str, Any]],
    task: Sequence[Mapping[str, Any]],
    *,
    max_length: int = 512,
    show_progress: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
    classification: Optional[Mapping[str, Any]] = None,
) -> UnitMap:
    """The map of :func:`~ssah_peft.scoring.attribution.conflict_scores`: the refusal margin (on the ``harmful``
    records' prompts) the ``task`` records' gradient would take away per unit of task progress. Task records with a
    system turn are batched per system turn."""
    task_batches = []
    for system in dict.fromkeys(record.get("system") for record in task):
        pairs = [record for record in task if record.get("system") == system]
        task_batches += build_calibration_batches(tokenizer, pairs, max_length=max_length, system_prompt=system)
    harmful_batches = _margin_batches(tokenizer, [record["prompt"] for record in harmful])
    scores = conflict_scores(
        model, task_batches, harmful_batches, refusal_margin_terms, show_progress_bar=show_progress, metadata=metadata
    )
    return one_score_map(scores, **dict(classification or {}))


def refusal_direction_map(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Mapping[str, Any]],
    harmless: Sequence[Mapping[str, Any]],
    *,
    max_length: int = 512,
    show_progress: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
    classification: Optional[Mapping[str, Any]] = None,
) -> UnitMap:
    """The map of :func:`~ssah_peft.scoring.attribution.refusal_direction_scores` of the ``harmful`` and
    ``harmless`` records' prompts."""
    batches = [
        build_calibration_batches(tokenizer, records, tokens="prompt", max_length=max_length)
        for records in (harmful, harmless)
    ]
    scores = refusal_direction_scores(model, *batches, show_progress_bar=show_progress, metadata=metadata)
    return one_score_map(scores, **dict(classification or {}))


#: The maps of one attribution score, by scorer name: ``make(model, tokenizer, safety_records, other_records, ...)``
#: where the other records are utility prompts (``margin_grad``), the fine-tuning data (``conflict``) or harmless
#: prompts (``refusal_direction``).
ATTRIBUTION_MAPS: dict[str, Callable[..., UnitMap]] = {
    "margin_grad": margin_grad_map,
    "conflict": conflict_map,
    "refusal_direction": refusal_direction_map,
}
