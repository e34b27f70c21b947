"""Degradation scan: size a unit group by pruning more and more of its candidates until something breaks.

Li & Kim (arXiv 2410.10862, Sec. 4) chose the group sizes by scanning pruning ratios. Each criterion ranks the
units (the same ranking :meth:`ssah_peft.UnitMap.from_scores` classifies with):

* ``"RU"``: smallest I_S + I_U first; the group must be removable without changing safety or utility;
* ``"SCU"``: largest I_S − I_U first; the group must be removable without changing utility (it is what safety
  needs and utility does not);
* ``"UCU"``: smallest I_S − I_U first; the group must be removable without changing safety.

The scan ablates the top fraction f for increasing f, measures the metrics after each step, and stops at the first
step where a watched metric moved by more than its tolerance from the intact model; the chosen size is the
largest fraction before that step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .._files import read_json, write_json
from ..evaluate import GenerationSettings, generate_responses, is_refusal, perplexity
from ..scoring import UnitScores
from ..unit_map import UnitMap
from ..units import UnitParts
from .ablation import ablate

CRITERIA: tuple[str, ...] = ("RU", "SCU", "UCU")
DEFAULT_FRACTIONS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
#: Watched metrics and their allowed absolute change, per criterion (for :func:`cheap_metrics`).
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "RU": {"refusal_rate": 0.1, "mean_nll": 0.1},
    "SCU": {"mean_nll": 0.1},
    "UCU": {"refusal_rate": 0.1},
}

MetricFn = Callable[[nn.Module], Mapping[str, float]]


def cheap_metrics(tokenizer: PreTrainedTokenizerBase, limit: int = 12, max_new_tokens: int = 16) -> MetricFn:
    """A metric function for scans: refusal rate on the first ``limit`` built-in harmful prompts (keywords,
    short greedy generations) and the mean NLL of the first ``limit`` utility-calibration responses."""
    from ..data import load_builtin

    harmful = [r["prompt"] for r in load_builtin("harmful_eval")][:limit]
    utility = list(load_builtin("utility_calibration"))[:limit]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, show_progress=False)

    def metrics(model: nn.Module) -> dict[str, float]:
        responses = generate_responses(model, tokenizer, harmful, settings)
        return {
            "refusal_rate": sum(map(is_refusal, responses)) / len(responses),
            "mean_nll": perplexity(model, tokenizer, utility, show_progress=False)["mean_nll"],
        }

    return metrics


@dataclass
class ScanResult:
    """Metrics after each pruning step of one criterion, and the chosen group size."""

    criterion: str
    baseline: dict[str, float]
    fractions: list[float]
    """Fractions evaluated, in order (the scan stops at the first that breaks a tolerance)."""
    metrics: list[dict[str, float]]
    tolerances: dict[str, float]
    chosen_fraction: float
    """The largest evaluated fraction whose metrics stayed within tolerance (0.0 if the first did not)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Union[str, Path]) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path]) -> ScanResult:
        return cls(**read_json(path))


def beyond_tolerance(
    values: Mapping[str, float], baseline: Mapping[str, float], tolerances: Mapping[str, float]
) -> list[str]:
    """The watched metrics of ``values`` that moved further from ``baseline`` than their tolerance: the stop rule
    of the scan, shared with the figure so that what it marks as broken is what stopped the scan."""
    return [name for name, allowed in tolerances.items() if abs(values[name] - baseline[name]) > allowed]


def top_units(
    scores_safety: UnitScores, scores_utility: UnitScores, criterion: str, fraction: float, **ranking: Any
) -> dict[str, dict[str, list[int]]]:
    """The ``fraction`` of units ranked first by ``criterion`` (module docstring); ``ranking`` passes
    ``standardize`` and ``ranking`` to :meth:`UnitMap.from_scores`."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    sizes = {name: fraction if name.upper() == criterion else 0.0 for name in ("scu", "ucu", "ru")}
    return UnitMap.from_scores(scores_safety, scores_utility, **sizes, **ranking).units_of(criterion)


def degradation_scan(
    model: nn.Module,
    tokenizer: Optional[PreTrainedTokenizerBase],
    scores_safety: UnitScores,
    scores_utility: UnitScores,
    criterion: str,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    metric_fn: Optional[MetricFn] = None,
    tolerance: Optional[Mapping[str, float]] = None,
    *,
    parts: UnitParts = "out_proj",
    standardize: bool = False,
    ranking: str = "global",
    unit_map: Optional[UnitMap] = None,
    show_progress: bool = True,
) -> ScanResult:
    """Scan increasing pruning fractions of one criterion's ranking and choose the group size (module docstring).

    Args:
        tokenizer: used by the default metric function (:func:`cheap_metrics`); may be None with ``metric_fn``.
        fractions: fractions of all units to ablate, scanned in increasing order.
        metric_fn: ``model -> {metric: value}``, evaluated on the intact model and after each step.
        tolerance: ``{metric: allowed absolute change}`` of the watched metrics (default:
            :data:`DEFAULT_TOLERANCES` for the criterion, which refer to :func:`cheap_metrics`).
        standardize, ranking: how units are ranked, as in :meth:`UnitMap.from_scores`.
        unit_map: if given, the result is recorded in ``unit_map.metadata["scan"][criterion]``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    fractions = sorted(fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ValueError(f"fractions must be in (0, 1], got {fractions}")
    if metric_fn is None:
        if tokenizer is None:
            raise ValueError("The default metric function needs the tokenizer")
        metric_fn = cheap_metrics(tokenizer)
    tolerances = dict(DEFAULT_TOLERANCES[criterion] if tolerance is None else tolerance)
    baseline = dict(metric_fn(model))
    missing = sorted(set(tolerances) - set(baseline))
    if missing:
        raise ValueError(f"The metric function returns {sorted(baseline)}, not the watched metrics {missing}")
    evaluated: list[float] = []
    metrics: list[dict[str, float]] = []
    chosen = 0.0
    for fraction in tqdm(fractions, desc=f"scan {criterion}", disable=not show_progress):
        units = top_units(scores_safety, scores_utility, criterion, fraction, standardize=standardize, ranking=ranking)
        with ablate(model, units, parts=parts):
            values = dict(metric_fn(model))
        evaluated.append(fraction)
        metrics.append(values)
        if beyond_tolerance(values, baseline, tolerances):
            break
        chosen = fraction
    result = ScanResult(
        criterion=criterion,
        baseline=baseline,
        fractions=evaluated,
        metrics=metrics,
        tolerances=tolerances,
        chosen_fraction=chosen,
    )
    if unit_map is not None:
        unit_map.metadata.setdefault("scan", {})[criterion] = result.to_dict()
    return result


def scores_of(unit_map: UnitMap) -> tuple[UnitScores, UnitScores]:
    """The safety and utility scores a unit map was classified from, to scan or reclassify it."""
    return tuple(  # type: ignore[return-value]
        UnitScores(
            scores={kind: tuple(t.double() for t in per_layer) for kind, per_layer in per_block.items()},
            method=unit_map.calibration.get(name, {}).get("method", "variance"),
            num_tokens=int(unit_map.calibration.get(name, {}).get("num_tokens", 0)),
            num_sequences=int(unit_map.calibration.get(name, {}).get("num_sequences", 0)),
            fingerprint=dict(unit_map.fingerprint),
        )
        for name, per_block in (("safety", unit_map.safety_scores), ("utility", unit_map.utility_scores))
    )


def reclassified(unit_map: UnitMap, **changes: Any) -> UnitMap:
    """``unit_map`` classified again from its own scores, its settings (``scu``, ``ucu``, ``ru``, ``standardize``,
    ``ranking``, ``composite_fraction``) as they are except ``changes``; calibration and metadata kept."""
    settings = {name: unit_map.settings[name] for name in ("scu", "ucu", "ru", "standardize", "ranking")}
    settings["composite_fraction"] = unit_map.composite_fraction
    unknown = sorted(set(changes) - set(settings))
    if unknown:
        raise TypeError(f"reclassified() got settings it does not know: {unknown}; it takes {sorted(settings)}")
    result = UnitMap.from_scores(*scores_of(unit_map), **{**settings, **changes})
    result.calibration, result.metadata = unit_map.calibration, unit_map.metadata
    return result
