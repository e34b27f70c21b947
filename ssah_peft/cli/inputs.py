"""Reading the user's input files: UTF-8 text, JSONL records, calibration pairs, prompts and unit maps.

Every reader names the file and line of a problem (``data.jsonl:3: not valid JSON``), so that a command can report
it as a user error (:func:`ssah_peft.cli.errors.user_errors`) before it loads a model. Its own module because the
commands share these readers, and the records of a data set are read one way whether they are calibration pairs
(``score``) or prompts (``probe``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..data.text_files import jsonl_records
from ..unit_map import UnitMap
from .errors import PathLike, user_errors
from .paths import check_safetensors_input


def read_pairs(source: str, limit: Optional[int] = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs, in order, from a JSONL file with ``"prompt"`` and ``"response"`` fields or from a
    built-in data set named in :data:`ssah_peft.data.BUILTIN_DATASETS` (e.g. ``"safety_calibration"``)."""
    records = read_records(source, ("prompt", "response"), "Calibration data", limit)
    return [(record["prompt"], record["response"]) for record in records]


def read_prompts(source: str, limit: Optional[int] = None) -> list[str]:
    """Prompts of a built-in data set or of a JSONL file with a ``prompt`` field; errors name the file and line."""
    return [record["prompt"] for record in read_records(source, ("prompt",), "--prompts", limit)]


def read_records(source: str, fields: Sequence[str], what: str, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """The first ``limit`` records of a JSONL file, or of a built-in data set (:data:`ssah_peft.data.BUILTIN_DATASETS`)
    when no such file exists, each a JSON object with text ``fields``.

    Errors name the record (``path:line``, ``set[i]``); ``what`` names the source in the others (not found, empty).
    """
    wanted = " and ".join(map(repr, fields)) + (" fields" if len(fields) > 1 else " field")
    if Path(source).is_file():
        records = jsonl_records(source)
    else:
        from ..data import BUILTIN_DATASETS, load_builtin

        if source not in BUILTIN_DATASETS:
            raise FileNotFoundError(
                f"{what} {source!r} is neither a file (JSONL with {wanted}) nor a built-in data set "
                f"({', '.join(sorted(BUILTIN_DATASETS))})"
            )
        records = [(f"{source}[{i}]", record) for i, record in enumerate(load_builtin(source))]
    checked = []
    for where, record in records[:limit]:
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in fields):
            raise ValueError(f"{where}: expected a JSON object with {'a ' if len(fields) == 1 else ''}{wanted}")
        checked.append(record)
    if not checked:
        raise ValueError(f"{what} {source!r} holds no examples")
    return checked


def load_unit_map(path: PathLike, option: str) -> UnitMap:
    """The :class:`~ssah_peft.UnitMap` of a file given as ``option``; every problem with the file names it."""
    check_safetensors_input(path, option)
    with user_errors(path):
        return UnitMap.load(path)
