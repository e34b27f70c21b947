"""Writing an export folder atomically: it appears complete, or not at all.

A format writes into a temporary folder next to the target (``.<name>.ssah-tmp-<12 hex digits>``); the files are
flushed to disk and the folder is renamed to the target. An existing target (empty, or replaced on request) is
renamed aside first and removed only once the new folder is in place, so an error at any point leaves the old
folder or nothing, never half an export. A killed process can leave its temporary folder behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

from .._files import TEMP_INFIX


def output_folder_problem(path: Union[str, os.PathLike], overwrite: bool) -> Optional[str]:
    """Why ``path`` cannot receive an export (a file, a folder with files in it without ``overwrite``, no write
    permission), or ``None``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        return (
            f"{path} is a folder that is not empty; choose a new folder, or allow replacing it (--overwrite, "
            "overwrite=True)"
        )
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK):
        return f"{path}: cannot write into {existing} (permission denied)"
    return None


def write_folder(path: Union[str, os.PathLike], overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call ``write(folder)`` on an empty temporary folder, then put it in place as ``path``; returns ``path``."""
    path = Path(path)
    problem = output_folder_problem(path, overwrite)
    if problem is not None:
        raise FileExistsError(problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}{TEMP_INFIX}{secrets.token_hex(6)}"
    temp.mkdir()  # not mkdtemp: the folder gets the usual permissions (umask), as the final folder should
    try:
        write(temp)
        _sync_tree(temp)
        if path.exists():
            aside = temp.with_name(temp.name + "-replaced")
            os.replace(path, aside)
            try:
                os.replace(temp, path)
            except BaseException:
                os.replace(aside, path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # gone already after a rename
    _sync(path.parent)
    return path


def _sync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, and the folders themselves, to disk before the rename publishes them."""
    for item in sorted(folder.rglob("*")):
        if item.is_file():
            with open(item, "rb") as file:
                os.fsync(file.fileno())
        else:
            _sync(item)
    _sync(folder)


def _sync(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # directories cannot be opened everywhere (Windows)
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
