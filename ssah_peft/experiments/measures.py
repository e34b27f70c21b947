"""The two measurements an experiment takes of a model: its evaluation metrics and its unit map.

A module of its own because every run of the demo and of ``benchmarks/demo_sweep.py`` is measured the same way
(the same subsets, generation settings and calibration data, :mod:`.data`), whichever stage or method produced the
model; the rows of one table are comparable only because of that.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from ..data import identity_shift_records, load_builtin
from ..evaluate import (
    GenerationSettings,
    audit_replies,
    evaluate_safety,
    evaluate_utility,
    generate_together,
    refusal_margins,
    selectivity,
    task_loss,
)
from ..scoring import (
    ScoringMethod,
    TokenSelection,
    UnitScores,
    UnitStatistics,
    build_calibration_batches,
    unit_statistics,
)
from ..scoring.accumulators import merged_accumulator
from ..unit_map import (
    CalibrationSet,
    CalibrationSettings,
    UnitMap,
    calibration_metadata,
    unit_map_from_calibration,
)
from .config import ATTACK_SETS, DemoConfig
from .data import spread, utility_split


def generation_settings(config: DemoConfig) -> GenerationSettings:
    """Greedy generation as every evaluation of the demo runs it (the ablation check's too)."""
    return GenerationSettings(
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generation_batch_size,
        show_progress=config.show_progress,
    )


def heldout_attack_records(name: str) -> list[dict[str, Any]]:
    """Records of the attack set ``name`` that no attack trains on, for its task loss: all of ``task_test`` for the
    task attack; for the identity shift, the persona's answers to the held-out utility instructions (its identity
    turns are trained on, so they are left out)."""
    if name == "task":
        return [dict(r) for r in load_builtin("task_test")]
    if name == "identity_shift":
        _, heldout = utility_split(load_builtin("utility_calibration"))
        return [r for r in identity_shift_records(heldout) if r["category"] != "identity"]
    raise KeyError(f"Unknown attack set {name!r}; known: {ATTACK_SETS}")


def continuous_measures(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    attack_successes: list[str],
    task_loss_attacks: Sequence[str] = ATTACK_SETS,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``(metrics, block)`` of the measures without generation (:mod:`ssah_peft.evaluate.margin`) and the audit of
    the generation ASR, each with its cost in seconds.

    The refusal margin is taken on all harmful and all look-alike prompts (teacher-forced, without generation, so
    the whole sets are affordable), its per-prompt values kept for paired tests; the task loss on each attack's held-out
    records (:func:`heldout_attack_records`); the audit sorts ``attack_successes`` (replies) into kinds
    (:func:`ssah_peft.evaluate.audit_replies`).
    """
    start = time.perf_counter()
    margins = {
        name: refusal_margins(model, tokenizer, [str(r["prompt"]) for r in load_builtin(dataset)])
        for name, dataset in (("harmful", "harmful_eval"), ("lookalike", "overrefusal_eval"))
    }
    margin_seconds = time.perf_counter() - start
    metrics = {
        "harmful_margin": float(margins["harmful"].mean()),
        "lookalike_margin": float(margins["lookalike"].mean()),
        "selectivity": selectivity(margins["harmful"], margins["lookalike"]),
    }
    losses = {}
    for attack in task_loss_attacks:
        start = time.perf_counter()
        records = heldout_attack_records(attack)
        losses[attack] = {"n": len(records), "mean_nll": task_loss(model, tokenizer, records)}
        losses[attack]["seconds"] = round(time.perf_counter() - start, 2)
        metrics[f"task_loss_{attack}"] = losses[attack]["mean_nll"]
    start = time.perf_counter()
    audit = audit_replies(attack_successes)
    block = {
        "refusal_margin": {
            **{name: [round(float(m), 5) for m in values] for name, values in margins.items()},
            "seconds": round(margin_seconds, 2),
        },
        "task_loss": losses,
        "attack_audit": {**audit, "seconds": round(time.perf_counter() - start, 4)},
    }
    return metrics, block


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: DemoConfig,
    *,
    continuous: bool = False,
    task_loss_attacks: Sequence[str] = ATTACK_SETS,
) -> dict[str, Any]:
    """ASR, over-refusal, task accuracy and perplexity on evenly spread subsets of the built-in sets.

    The prompts of all three rates are generated in one batched call (:func:`ssah_peft.evaluate.generate_together`;
    ``generation_seconds``), so each block's ``seconds`` holds only its judging. Perplexity is measured on held-out
    utility answers (never trained on in the demo): the PPL of the report. The result's ``generations`` are
    written next to it by :func:`.caching.cached_result`.

    ``continuous=True`` adds the measures of :func:`continuous_measures` (refusal margins, selectivity, the task
    loss of each of ``task_loss_attacks``, the audit of the attack successes) to ``metrics`` and as the block
    ``continuous``. Off by default, so results and reports of runs cached without them are reproduced unchanged.
    """
    settings = generation_settings(config)
    start = time.perf_counter()
    _, heldout = utility_split(load_builtin("utility_calibration"))
    harmful = spread(load_builtin("harmful_eval"), config.harmful_prompts)
    benign = spread(load_builtin("overrefusal_eval"), config.overrefusal_prompts)
    task = spread(load_builtin("task_test"), config.task_prompts)
    generating = time.perf_counter()
    responses = generate_together(model, tokenizer, (harmful, benign, task), settings)
    generation_seconds = time.perf_counter() - generating
    safety, safety_generations = evaluate_safety(
        model, tokenizer, harmful=harmful, benign=benign, settings=settings, responses=responses
    )
    utility, utility_generations = evaluate_utility(
        model,
        tokenizer,
        task=task,
        settings=settings,
        perplexity_sets={"utility_heldout": spread(heldout, config.perplexity_texts)},
        responses=responses,
    )
    metrics = {
        "asr": safety["harmful"]["asr"],
        "overrefusal": safety["overrefusal"]["rate"],
        "task_accuracy": utility["task"]["accuracy"],
        "perplexity": utility["perplexity"]["utility_heldout"]["ppl"],
    }
    extra: dict[str, Any] = {}
    if continuous:
        successes = [g["response"] for g in safety_generations if g["dataset"] == "harmful" and g["harmful"]]
        continuous_metrics, extra["continuous"] = continuous_measures(model, tokenizer, successes, task_loss_attacks)
        metrics.update(continuous_metrics)
    return {
        "metrics": metrics,
        "safety": safety,
        "utility": utility,
        **extra,
        "generation_seconds": round(generation_seconds, 2),
        "eval_seconds": round(time.perf_counter() - start, 2),
        "generations": safety_generations + utility_generations,
    }


#: The rates of a result: (name in ``metrics``, its evaluation block, the block's count of hits).
RATES: tuple[tuple[str, tuple[str, str], str], ...] = (
    ("asr", ("safety", "harmful"), "attack_successes"),
    ("overrefusal", ("safety", "overrefusal"), "refusals"),
    ("task_accuracy", ("utility", "task"), "correct"),
)


def rate_counts(result: Mapping[str, Any], metric: str) -> Optional[tuple[int, int]]:
    """(hits, n) behind the rate ``metric`` of a run's result; None where the result holds no counts."""
    for name, (group, block), count_key in RATES:
        if name == metric:
            counts = result.get(group, {}).get(block, {})
            if count_key in counts and counts.get("n"):
                return int(counts[count_key]), int(counts["n"])
    return None


def unit_map_of(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: DemoConfig,
    fractions: Mapping[str, float],
    *,
    method: ScoringMethod = "variance",
    half: Optional[int] = None,
    tokens: TokenSelection = "response",
) -> UnitMap:
    """Score ``model`` on the safety and utility calibration sets (the paper's Eq. 1, or the ``method`` baseline)
    and classify its units at ``fractions`` (``scu``, ``ucu``, ``ru``: :attr:`DemoConfig.unit_fractions` or
    :attr:`DemoConfig.alignment_fractions`).

    ``half`` (0 or 1) scores only every other calibration pair, starting at that one: two disjoint halves that
    both cover every category, for the stability of the unit sets (:mod:`.stability`). ``tokens``: which tokens of
    each exchange are scored (:func:`ssah_peft.build_calibration_batches`); the demo scores the responses.
    """
    if half not in (None, 0, 1):
        raise ValueError(f"half must be None, 0 or 1, got {half!r}")
    safety, utility = (demo_calibration_set(name, config, half) for name in CALIBRATION_DATA)
    return unit_map_from_calibration(
        model,
        tokenizer,
        safety,
        utility,
        CalibrationSettings(method=method, tokens=tokens, max_length=config.max_length),
        classification={**fractions, "composite_fraction": config.top_composite_fraction},
        show_progress=config.show_progress,
    )


#: The built-in sets every demo map is scored on: safety, then utility.
CALIBRATION_DATA = ("safety_calibration", "utility_calibration")


def demo_calibration_set(name: str, config: DemoConfig, half: Optional[int] = None) -> CalibrationSet:
    """The calibration pairs of the built-in set ``name`` that the demo scores: ``config.calibration_pairs`` spread
    over its categories, or every other one of those from ``half`` on (recorded as ``half``)."""
    pairs = spread(load_builtin(name), config.calibration_pairs)
    return CalibrationSet(name, pairs) if half is None else CalibrationSet(name, pairs[half::2], {"half": half})


#: Scorers whose statistic is the same float64 moments as the variance score (only the weight factor differs), so
#: :func:`unit_maps_in_one_pass` gets their maps from the variance pass.
MOMENT_SCORERS: tuple[str, ...] = ("variance", "wanda")


def unit_maps_in_one_pass(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: DemoConfig,
    fractions: Mapping[str, float],
    *,
    rivals: tuple[str, ...] = ("wanda",),
) -> dict[str, Any]:
    """What ``unit_map_of`` gives for all calibration data, for each half (``half=0``, ``half=1``) and for each
    rival scorer of :data:`MOMENT_SCORERS`, from ONE forward pass over the calibration data instead of 2 + len(rivals).

    The pass runs over the two halves' batches (exactly the batches of ``unit_map_of(..., half=h)``) and keeps each
    half's float64 moments; the moments of all data are their exact merge (Chan et al., as the scorer merges
    batches), and Wanda's scores are the same moments times another weight factor. Returns ``{"full": map,
    "halves": [map of half 0, map of half 1], <rival>: map}``. The full map equals ``unit_map_of``'s up to the
    float32 rounding of activations in differently composed batches.
    """
    unknown = sorted(set(rivals) - set(MOMENT_SCORERS))
    if unknown:
        raise ValueError(f"Rival scorers {unknown} need a pass of their own; one pass serves {MOMENT_SCORERS}")
    scores: dict[str, list[UnitScores]] = {key: [] for key in ("full", "half0", "half1", *rivals)}
    settings = CalibrationSettings(max_length=config.max_length)
    for name in CALIBRATION_DATA:
        halves = []
        for half in (0, 1):
            data = demo_calibration_set(name, config, half)
            batches = build_calibration_batches(tokenizer, data.pairs, max_length=settings.max_length)
            statistics = unit_statistics(
                model,
                batches,
                method="variance",
                show_progress_bar=config.show_progress,
                metadata=calibration_metadata(data, settings),
            )
            halves.append(statistics)
            scores[f"half{half}"].append(statistics.finalize())
        merged = {
            kind: tuple(
                merged_accumulator("variance", [first, second]).state()
                for first, second in zip(halves[0].states[kind], halves[1].states[kind])
            )
            for kind in halves[0].states
        }
        weight_factors = {"variance": halves[0].weight_statistics}
        if rivals:  # Σ_i |W_ij| of every output projection: a pass over no batches computes only that
            weight_factors["wanda"] = unit_statistics(
                model, [], method="wanda", show_progress_bar=False
            ).weight_statistics
        for key, method in (("full", "variance"), *((rival, rival) for rival in rivals)):
            scores[key].append(
                UnitStatistics(
                    method=method,
                    states=merged,
                    weight_statistics=weight_factors[method],
                    fingerprint=halves[0].fingerprint,
                    metadata=calibration_metadata(demo_calibration_set(name, config), settings),
                ).finalize()
            )

    def classify(pair: list[UnitScores]) -> UnitMap:
        return UnitMap.from_scores(pair[0], pair[1], **fractions, composite_fraction=config.top_composite_fraction)

    return {
        "full": classify(scores["full"]),
        "halves": [classify(scores["half0"]), classify(scores["half1"])],
        **{rival: classify(scores[rival]) for rival in rivals},
    }
