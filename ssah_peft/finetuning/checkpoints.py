"""A run's checkpoints: which one a resumed job continues from, whether one is complete and fits the run's unit
map, and the adapter saved so that an old one is replaced only by a complete new one.

A module of its own because resuming is a contract with files a killed job may have left half-written: the
Trainer writes ``checkpoint-<step>`` folders (``trainer_state.json`` last), and a job must continue from the last
complete one, with the units it was trained with, whatever the kill interrupted.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

from .._files import read_json, read_safetensors
from ..training import Method
from ..unit_map import UnitMap

#: The Trainer's checkpoint folders, ``checkpoint-<step>``.
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def resume_checkpoint(checkpoints: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``checkpoints`` for ``resume``, or None (training starts at step 0).

    A kill during the Trainer's save leaves a checkpoint folder without its ``trainer_state.json`` (written last)
    or with a truncated file; such a folder is passed over for the one before it, saying so on stdout (the Trainer
    writes the same checkpoint again when it gets there).
    """
    found = (
        [p for p in checkpoints.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
        if checkpoints.is_dir()
        else []
    )
    passed_over = []
    for folder in sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            if passed_over:
                print(f"resuming from {folder.name}, the last complete checkpoint")
            return folder
        print(f"{folder} is incomplete ({problem}: its save was interrupted); passed over")
        passed_over.append(folder)
    if passed_over:
        print("no complete checkpoint to resume from: training starts at step 0")
    return None


def checkpoint_problem(folder: Path) -> Optional[str]:
    """What makes a Trainer checkpoint folder unusable (a file missing, truncated or damaged), or None. Cheap: the
    safetensors headers are checked against the file sizes, and the ``torch.save`` archives for their index at the
    end of the file, without loading any tensor."""
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            try:
                read_json(path)
            except ValueError:
                return f"{path.name} is not complete JSON"
        elif path.suffix == ".safetensors":
            try:
                with read_safetensors(path, "a checkpoint's tensors"):
                    pass
            except (ValueError, OSError):
                return f"{path.name} is truncated or damaged"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or damaged"
    return None


def check_checkpoint_units(method: Method, unit_map: UnitMap, path: Path, checkpoint: Path) -> None:
    """The run's unit map ``path`` must choose the units its ``checkpoint`` was trained with: a map replaced since
    would build another adapter, which the checkpoint's tensors do not fit."""
    config_file = checkpoint / "adapter_config.json"
    if method.units is None or not config_file.is_file():
        return
    trained = read_json(config_file).get("units")
    if trained is not None and _unit_triples(trained) != _unit_triples(method.units_of(unit_map)):
        raise ValueError(
            f"{path} is not the unit map this run was trained with: it chooses other {method.units.name} units than "
            f"{checkpoint} holds (was it replaced?); put the run's own map back, or start a new run in a new folder"
        )


def _unit_triples(units: Any) -> set[tuple[int, str, int]]:
    return {
        (int(layer), kind, int(i))
        for layer, blocks in units.items()
        for kind, indices in blocks.items()
        for i in indices
    }


def save_adapter(model: Any, adapter: Path) -> None:
    """``model.save_pretrained(adapter)`` that replaces an old adapter only once the new one is complete."""
    staging = adapter.parent / f".{adapter.name}.partial"
    old = adapter.parent / f".{adapter.name}.old"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(staging)
    if adapter.exists():
        adapter.rename(old)
    staging.rename(adapter)
    shutil.rmtree(old, ignore_errors=True)
