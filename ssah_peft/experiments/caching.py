"""Resumable experiments: results and artifacts cached in a run directory, and the check that a run directory
holds results of the same settings.

A module of its own because resuming is a contract with files already on disk: every stage of the demo and every
run of ``benchmarks/demo_sweep.py`` stores its output through these functions, and a run directory made by an
earlier version must still resume. ``result.json`` files are written atomically (a half-written one is never
trusted), generations go to ``generations.jsonl`` beside them, and ``config.json`` pins the settings
(:meth:`~.config.DemoConfig.to_json`): mixing results of two settings would make a table lie.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .._files import differing_keys, write_json
from ..evaluate import write_generations
from .config import DemoConfig


class Saveable(Protocol):
    def save(self, path: Path) -> Any: ...


Artifact = TypeVar("Artifact", bound=Saveable)


def cached_result(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON result at ``path``, computing and writing it first when it is not there.

    ``generations`` of a computed result go to ``generations.jsonl`` next to it. The JSON is written through a
    temporary file, so an interrupted run never leaves a half-written result that a rerun would trust.
    """
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    result = compute()
    generations = result.pop("generations", [])
    if generations:
        write_generations(path.parent / "generations.jsonl", generations)
    write_json(path, result, indent=2, ensure_ascii=False)
    return result


def cached_artifact(path: Path, compute: Callable[[], Artifact], load: Callable[[Path], Artifact]) -> Artifact:
    """The artifact saved at ``path`` (a unit map, ablation table or probe result), computed and saved first when
    it is not there."""
    if path.is_file():
        return load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    artifact = compute()
    artifact.save(path)
    return artifact


def check_run_dir(config: DemoConfig) -> None:
    """Create ``config.run_dir`` and pin its settings in ``config.json``; ``ValueError`` naming the differing
    settings when it already holds results of other settings."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    path = config.run_dir / "config.json"
    settings = config.to_json()
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != settings:
            raise ValueError(
                f"{config.run_dir} holds results of other settings "
                f"({', '.join(differing_keys(settings, previous))} differ); "
                "use another --run-dir or delete it"
            )
    else:
        write_json(path, settings)
