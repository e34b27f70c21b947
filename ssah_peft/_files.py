"""Writing artefacts reproducibly and atomically: unit maps and partial score files.

* **Reproducible**: safetensors writes its ``__metadata__`` from a hash map, so the same tensors and metadata give
  other bytes on every save. :func:`safetensors_bytes` rewrites the header in a fixed order (metadata keys sorted,
  tensors in the order of their data), so the same content always gives the same file.
* **Atomic**: :func:`write_atomic` writes a temporary file next to the target, flushes it to disk and renames it
  over the target, so a reader (or a killed save) never sees half a file: the target is the old file or the new one.
  A killed save leaves its temporary file behind (nothing runs in a killed process); the next successful save of
  the same target removes it. Temporary files of saves still running elsewhere are held locked and kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

try:  # POSIX: a writer holds a lock on its temporary file, so cleaning up never removes a save in progress
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Temporary files are named ``.<target name>.ssah-tmp-<12 hex digits>`` in the target's directory.
TEMP_INFIX = ".ssah-tmp-"
_TEMP_TOKEN = re.compile(r"[0-9a-f]{12}")


def canonical_json(value: object) -> str:
    """JSON with sorted keys: equal values give equal text, whatever the insertion order of their dicts."""
    return json.dumps(value, sort_keys=True)


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata (module docstring)."""
    raw = safetensors_save(dict(tensors), metadata=dict(metadata))
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items()))}
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text + raw[8 + length :]


@contextlib.contextmanager
def read_safetensors(path: Union[str, Path], what: str) -> Iterator[Any]:
    """``safe_open(path)`` whose errors name the file: ``ValueError`` for a file that is not readable safetensors
    (garbage, truncated, empty), ``IsADirectoryError`` for a directory; ``what`` says what the file should be."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory, not {what}")
    try:
        with safe_open(str(path), framework="pt") as file:
            yield file
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None


def check_format(
    path: Union[str, Path], header: Mapping[str, str], *, name: str, version: str, what: str, advice: str = ""
) -> None:
    """Refuse a file whose header does not declare format ``name`` at ``version``; ``what`` says what the file
    should be (``"unit map"``), ``advice`` ends the version error (how to get a file of this version)."""
    if header.get("format") != name:
        raise ValueError(f"{path} is not an ssah-peft {what} (format: {header.get('format')!r})")
    if header.get("format_version") != version:
        raise ValueError(
            f"{path} has {what} format version {header.get('format_version')!r}; this ssah-peft reads "
            f"version {version}{advice}"
        )


def write_json(path: Union[str, Path], data: Any, indent: Union[int, None] = 2) -> Path:
    """Write ``data`` as a JSON file (UTF-8, newline-terminated) atomically; returns the path."""
    path = Path(path)
    write_atomic(path, (json.dumps(data, indent=indent) + "\n").encode("utf-8"))
    return path


def read_json(path: Union[str, Path]) -> Any:
    """The content of a JSON file written by :func:`write_json` (or by hand)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def differing_keys(pinned: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two settings files (missing on one side counts), sorted: what an
    error about a run folder of other settings names."""
    return sorted(key for key in pinned.keys() | found.keys() if pinned.get(key) != found.get(key))


def write_atomic(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, then remove temporary files that killed saves of ``path`` left."""
    path = Path(path)
    temp = path.parent / f".{path.name}{TEMP_INFIX}{secrets.token_hex(6)}"
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as error:  # name the target, not the temporary file
        raise type(error)(error.errno, f"Cannot write {path} ({error.strerror})") from None
    replaced = False
    try:
        with os.fdopen(descriptor, "wb") as file:
            if fcntl is not None:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            if os.name == "posix":  # rename while the lock is held (Windows cannot rename an open file)
                os.replace(temp, path)
                replaced = True
        if not replaced:
            os.replace(temp, path)
            replaced = True
    finally:
        if not replaced:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    _sync_directory(path.parent)
    remove_stale_temporary_files(path)


def remove_stale_temporary_files(path: Union[str, Path]) -> list[Path]:
    """Remove the temporary files that killed saves of ``path`` left in its directory; returns them.

    Only files named by :func:`write_atomic` for this target are considered, and of those only files no running
    save holds locked.
    """
    path = Path(path)
    prefix = f".{path.name}{TEMP_INFIX}"
    removed = []
    with contextlib.suppress(OSError):
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
        for candidate in candidates:
            if _TEMP_TOKEN.fullmatch(candidate.name[len(prefix) :]) and _remove_if_unlocked(candidate):
                removed.append(candidate)
    return removed


def _remove_if_unlocked(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            if fcntl is not None:
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # a save in progress
            path.unlink()
            return True
    except OSError:
        return False


def _sync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
