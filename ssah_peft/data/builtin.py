"""The project's own data sets: calibration, fine-tuning task and evaluation prompts, shipped in the wheel.

They are written for this project (see ``README.md`` next to this file) so that everything, from unit
scoring to the evaluation of a fine-tuned model, runs without a data hub. Stored sets are JSONL files in
this package; the fine-tuning task is generated from a fixed seed (:mod:`ssah_peft.data.task`).
"""

from __future__ import annotations

import json
from importlib import resources

from datasets import Dataset

from .task import task_splits

#: Built-in data sets by name, with what they are for.
BUILTIN_DATASETS: dict[str, str] = {
    "safety_calibration": "harmful requests paired with refusals (prompt, response, category), for safety scores I_S",
    "utility_calibration": "benign instructions with correct answers (prompt, response, category), "
    "for utility scores I_U",
    "task_train": "generated benign fine-tuning task, training split (prompt, response, answer, category)",
    "task_test": "generated benign fine-tuning task, test split for exact-match accuracy",
    "harmful_eval": "held-out harmful requests (prompt, category), for the attack success rate",
    "overrefusal_eval": "benign prompts that look sensitive (prompt, category), for the over-refusal rate",
}

_STORED = ("safety_calibration", "utility_calibration", "harmful_eval", "overrefusal_eval")


def _read_jsonl(name: str) -> list[dict[str, str]]:
    """Records of a stored built-in set, in file order."""
    text = resources.files(__package__).joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_builtin(name: str) -> Dataset:
    """A built-in data set (see :data:`BUILTIN_DATASETS`) as a ``datasets.Dataset``."""
    if name in _STORED:
        return Dataset.from_list(_read_jsonl(name))
    if name in ("task_train", "task_test"):
        train, test = task_splits()
        return Dataset.from_list(train if name == "task_train" else test)
    raise KeyError(f"Unknown built-in data set {name!r}; known: {sorted(BUILTIN_DATASETS)}")
