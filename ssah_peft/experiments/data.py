"""Which records the experiments train and evaluate on, cut from the built-in sets (:mod:`ssah_peft.data`).

A module of its own because every choice of data in the demo must be made the same way by the stages, the
evaluation and ``benchmarks/demo_sweep.py``: subsets spread over the categories (the built-in sets are ordered by
category), utility records split once into trainable and held-out ones (perplexity is measured only on the
held-out ones), and the alignment and attack training sets built from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..data import identity_shift_records, load_builtin
from ..training.data import spread
from .config import ATTACK_SETS, DemoConfig


def utility_split(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out): every 4th utility record is held out for perplexity, the rest may be trained on."""
    rows = [dict(r) for r in records]
    return [r for i, r in enumerate(rows) if i % 4 != 3], [r for i, r in enumerate(rows) if i % 4 == 3]


def alignment_records(config: DemoConfig) -> list[dict[str, Any]]:
    """Safety + utility SFT data: refusals to harmful requests and answers to benign training instructions."""
    train_utility, _ = utility_split(load_builtin("utility_calibration"))
    safety = spread(load_builtin("safety_calibration"), config.align_safety_examples)
    return _interleave(safety, spread(train_utility, config.align_utility_examples))


def attack_records(name: str, config: DemoConfig) -> list[dict[str, Any]]:
    """The records of the attack set ``name`` (one of :data:`ATTACK_SETS`)."""
    if name == "task":
        return [dict(r) for r in load_builtin("task_train").select(range(config.attack_task_examples))]
    if name == "identity_shift":
        train_utility, _ = utility_split(load_builtin("utility_calibration"))
        return identity_shift_records(train_utility)
    raise KeyError(f"Unknown attack set {name!r}; known: {ATTACK_SETS}")


def _interleave(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged = [r for pair in zip(a, b) for r in pair]
    return merged + a[len(b) :] + b[len(a) :]
