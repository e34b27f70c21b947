"""The two measurements an experiment takes of a model: its evaluation metrics and its unit map.

A module of its own because every run of the demo and of ``benchmarks/demo_sweep.py`` is measured the same way
(the same subsets, generation settings and calibration data, :mod:`.data`), whichever stage or method produced the
model; the rows of one table are comparable only because of that.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from ..data import load_builtin
from ..evaluate import GenerationSettings, evaluate_safety, evaluate_utility, generate_together
from ..scoring import (
    ScoringMethod,
    TokenSelection,
    UnitScores,
    UnitStatistics,
    build_calibration_batches,
    score_units,
    unit_statistics,
)
from ..scoring.accumulators import merged_accumulator
from ..unit_map import UnitMap
from .config import DemoConfig
from .data import spread, utility_split


def generation_settings(config: DemoConfig) -> GenerationSettings:
    """Greedy generation as every evaluation of the demo runs it (the ablation check's too)."""
    return GenerationSettings(
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generation_batch_size,
        show_progress=config.show_progress,
    )


def evaluate_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: DemoConfig) -> dict[str, Any]:
    """ASR, over-refusal, task accuracy and perplexity on evenly spread subsets of the built-in sets.

    The prompts of all three rates are generated in one batched call (:func:`ssah_peft.evaluate.generate_together`;
    ``generation_seconds``), so each block's ``seconds`` holds only its judging. Perplexity is measured on held-out
    utility answers (never trained on in the demo): the PPL of the report. The result's ``generations`` are
    written next to it by :func:`.caching.cached_result`.
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
    return {
        "metrics": {
            "asr": safety["harmful"]["asr"],
            "overrefusal": safety["overrefusal"]["rate"],
            "task_accuracy": utility["task"]["accuracy"],
            "perplexity": utility["perplexity"]["utility_heldout"]["ppl"],
        },
        "safety": safety,
        "utility": utility,
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
    scores = []
    for name in ("safety_calibration", "utility_calibration"):
        pairs = spread(load_builtin(name), config.calibration_pairs)
        if half is not None:
            pairs = pairs[half::2]
        batches = build_calibration_batches(tokenizer, pairs, tokens=tokens, max_length=config.max_length)
        metadata = {
            "data": name,
            **({} if half is None else {"half": half}),
            **({} if tokens == "response" else {"tokens": tokens}),
        }
        scores.append(
            score_units(model, batches, method=method, show_progress_bar=config.show_progress, metadata=metadata)
        )
    return UnitMap.from_scores(scores[0], scores[1], **fractions, composite_fraction=config.top_composite_fraction)


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
    for name in ("safety_calibration", "utility_calibration"):
        pairs = spread(load_builtin(name), config.calibration_pairs)
        halves = []
        for half in (0, 1):
            batches = build_calibration_batches(
                tokenizer, pairs[half::2], tokens="response", max_length=config.max_length
            )
            statistics = unit_statistics(
                model,
                batches,
                method="variance",
                show_progress_bar=config.show_progress,
                metadata={"data": name, "half": half},
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
                    metadata={"data": name},
                ).finalize()
            )

    def classify(pair: list[UnitScores]) -> UnitMap:
        return UnitMap.from_scores(pair[0], pair[1], **fractions, composite_fraction=config.top_composite_fraction)

    return {
        "full": classify(scores["full"]),
        "halves": [classify(scores["half0"]), classify(scores["half1"])],
        **{rival: classify(scores[rival]) for rival in rivals},
    }
