"""Writing artefacts reproducibly and atomically, and reading their headers without trusting them.

Every file ssah-peft writes (unit maps, partial score files, reports, figures, CSV and JSON results) goes through
:func:`write_atomic`, by way of :func:`write_json`, :func:`write_text` or :func:`write_figure`.

* **Reproducible**: safetensors writes its ``__metadata__`` from a hash map, so the same tensors and metadata give
  other bytes on every save. :func:`safetensors_bytes` rewrites the header in a fixed order (metadata keys sorted,
  tensors in the order of their data), so the same content always gives the same file.
* **Atomic**: :func:`write_atomic` writes a temporary file next to the target, flushes it to disk and renames it
  over the target, so a reader (or a killed save) never sees half a file: the target is the old file or the new one.
  A killed save leaves its temporary file behind (nothing runs in a killed process); the next successful save of
  the same target removes it. Temporary files of saves still running elsewhere are held locked and kept. A save
  that fails (a full disk, a quota) removes its temporary file and raises the ``OSError`` naming the target.
* **Headers read before they are trusted**: a file's header may claim millions of layers or shards, so the readers
  bound its JSON fields (:func:`header_json`) and check the tensor names a header promises against those present
  without listing them all (:func:`layer_tensor_problems`): the memory a read takes follows the file, not its claims.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import os
import re
import secrets
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


#: Longest JSON field of a file header that :func:`header_json` parses. Our files write a few KiB per field (a
#: fingerprint lists a width per layer and block kind, a calibration record a data path and a system prompt); a
#: field of millions of numbers only comes from a damaged or crafted file, and parsing it would take ~10x its size.
MAX_HEADER_FIELD_CHARS = 4 * 2**20


def header_json(path: Union[str, Path], header: Mapping[str, str], name: str) -> Any:
    """The JSON field ``name`` of a file's header (``KeyError`` if absent); a ``ValueError`` naming the file and the
    field when it is longer than :data:`MAX_HEADER_FIELD_CHARS` or not JSON."""
    text = header[name]
    if len(text) > MAX_HEADER_FIELD_CHARS:
        raise ValueError(
            f"{path}: metadata field {name!r} is {len(text)} characters long, more than ssah-peft writes (at most "
            f"{MAX_HEADER_FIELD_CHARS}); the header is damaged"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: metadata field {name!r} is not valid JSON ({error})") from None


def layer_tensor_problems(
    present: Collection[str], prefixes: Sequence[str], num_layers: int, kinds: Sequence[str], *, listed: int = 12
) -> tuple[str, str]:
    """``(missing, unexpected)``: which of the tensors ``<prefix>.<layer>.<kind>`` a header promises (every prefix,
    layer below ``num_layers`` and kind) are absent from ``present``, and which names of ``present`` are not among
    them, each as a text listing the first ``listed`` names ("" when none).

    The promised names are never all listed: a damaged header may claim millions of layers, so the work and memory
    follow the tensors present, plus the ``listed`` missing names looked for in file order (layer, kind, prefix).
    """
    wanted_prefixes, wanted_kinds = set(prefixes), set(kinds)

    def promised(key: str) -> bool:
        parts = key.rsplit(".", 2)
        if len(parts) != 3:
            return False
        prefix, layer, kind = parts
        return (
            prefix in wanted_prefixes
            and kind in wanted_kinds
            and layer.isascii()
            and layer.isdigit()
            and str(int(layer)) == layer
            and int(layer) < num_layers
        )

    found = sum(1 for key in present if promised(key))
    num_missing = num_layers * len(kinds) * len(prefixes) - found
    names = layer_tensor_names(prefixes, num_layers, kinds)
    missing = list(itertools.islice((key for key in names if key not in present), listed)) if num_missing else []
    unexpected = sorted(key for key in present if not promised(key))
    return _listing(missing, num_missing, listed), _listing(unexpected[:listed], len(unexpected), listed)


def layer_tensor_names(prefixes: Sequence[str], num_layers: int, kinds: Sequence[str]) -> Iterator[str]:
    """The names ``<prefix>.<layer>.<kind>`` in file order (layer, kind, prefix), one at a time."""
    return (f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in kinds for prefix in prefixes)


def _listing(names: Sequence[str], total: int, listed: int) -> str:
    return ", ".join(names) + (f" and {total - listed} more" if total > listed else "")


def write_json(path: Union[str, Path], data: Any, indent: Union[int, None] = 2, *, ensure_ascii: bool = True) -> Path:
    """Write ``data`` as a JSON file (UTF-8, newline-terminated) atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n")


def write_text(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` as a UTF-8 file atomically; returns the path."""
    path = Path(path)
    write_atomic(path, text.encode("utf-8"))
    return path


def write_figure(path: Union[str, Path], figure: Figure, **savefig_options: Any) -> Path:
    """Write a matplotlib figure as a PNG file atomically (rendered in memory first); returns the path."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig_options)
    path = Path(path)
    write_atomic(path, buffer.getvalue())
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
        raise _write_error(path, error) from None
    replaced = False
    try:
        with os.fdopen(descriptor, "wb") as file:
            if fcntl is not None:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # where a full disk shows on file systems that allocate late
            if os.name == "posix":  # rename while the lock is held (Windows cannot rename an open file)
                os.replace(temp, path)
                replaced = True
        if not replaced:
            os.replace(temp, path)
            replaced = True
    except OSError as error:  # a full disk, a quota: name the target; the previous file is kept
        raise _write_error(path, error) from None
    finally:
        if not replaced:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    _sync_directory(path.parent)
    remove_stale_temporary_files(path)


def _write_error(path: Path, error: OSError) -> OSError:
    """``error`` (same type and errno) saying which file could not be written, rather than its temporary file."""
    if error.errno is None:
        return type(error)(f"Cannot write {path} ({error})")
    return type(error)(error.errno, f"Cannot write {path} ({error.strerror})")


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


@contextlib.contextmanager
def exclusive_lock(path: Union[str, Path], what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` for the ``with`` block, so that one process at a time works on
    ``what`` (a run folder); the file is created, holds the holder's process id while locked and is removed at the
    end. ``BlockingIOError`` naming the holder's pid when another process holds it: the lock never waits.

    The lock is ``flock``'s, released by the system when its holder dies, so a killed holder leaves a stale file
    that the next process simply locks. A no-op where ``fcntl`` does not exist (Windows).
    """
    path = Path(path)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise BlockingIOError(errno.EWOULDBLOCK, f"{what} is in use by another process{holder}") from None
        try:  # the last holder removes the file when it is done: lock the file that is still there
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(descriptor)


def _lock_holder(descriptor: int) -> str:
    """`` (process N)`` as the holder of a lock file wrote it, or "" where it has not yet."""
    try:
        return f" (process {int(os.pread(descriptor, 32, 0))})"
    except (OSError, ValueError):
        return ""
