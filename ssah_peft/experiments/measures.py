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
from ..evaluate import GenerationSettings, evaluate_safety, evaluate_utility
from ..scoring import ScoringMethod, build_calibration_batches, score_units
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

    Perplexity is measured on held-out utility answers (never trained on in the demo) and on task answers. The
    result's ``generations`` are written next to it by :func:`.caching.cached_result`.
    """
    settings = generation_settings(config)
    start = time.perf_counter()
    _, heldout = utility_split(load_builtin("utility_calibration"))
    task = spread(load_builtin("task_test"), config.task_prompts)
    safety, safety_generations = evaluate_safety(
        model,
        tokenizer,
        harmful=spread(load_builtin("harmful_eval"), config.harmful_prompts),
        benign=spread(load_builtin("overrefusal_eval"), config.overrefusal_prompts),
        settings=settings,
    )
    utility, utility_generations = evaluate_utility(
        model,
        tokenizer,
        task=task,
        settings=settings,
        perplexity_sets={
            "utility_heldout": spread(heldout, config.perplexity_texts),
            "task_test": spread(task, config.perplexity_texts),
        },
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
        "eval_seconds": round(time.perf_counter() - start, 2),
        "generations": safety_generations + utility_generations,
    }


def unit_map_of(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: DemoConfig,
    fractions: Mapping[str, float],
    *,
    method: ScoringMethod = "variance",
    half: Optional[int] = None,
) -> UnitMap:
    """Score ``model`` on the safety and utility calibration sets (the paper's Eq. 1, or the ``method`` baseline)
    and classify its units at ``fractions`` (``scu``, ``ucu``, ``ru``: :attr:`DemoConfig.unit_fractions` or
    :attr:`DemoConfig.alignment_fractions`).

    ``half`` (0 or 1) scores only every other calibration pair, starting at that one: two disjoint halves that
    both cover every category, for the stability of the unit sets (:mod:`.stability`).
    """
    if half not in (None, 0, 1):
        raise ValueError(f"half must be None, 0 or 1, got {half!r}")
    scores = []
    for name in ("safety_calibration", "utility_calibration"):
        pairs = spread(load_builtin(name), config.calibration_pairs)
        if half is not None:
            pairs = pairs[half::2]
        batches = build_calibration_batches(tokenizer, pairs, tokens="response", max_length=config.max_length)
        metadata = {"data": name} if half is None else {"data": name, "half": half}
        scores.append(
            score_units(model, batches, method=method, show_progress_bar=config.show_progress, metadata=metadata)
        )
    return UnitMap.from_scores(scores[0], scores[1], **fractions, composite_fraction=config.top_composite_fraction)
