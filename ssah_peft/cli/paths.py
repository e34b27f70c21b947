"""The paths a command is given: input files that must exist, output files and folders that may be written, and
the files ssah-peft writes, recognised by their contents.

**Outputs.** A command replaces an existing file only when the file is one ssah-peft writes of the same kind (a
unit map with a unit map, a partial score file with a partial score file, ``probe.json`` with a probe result,
a PNG figure with a PNG, ...; recognised by its contents, not its name) or when ``--overwrite`` is given. The
folder of an output file must exist; an output folder (``--out-dir``, ``--out``, ``--run-dir``) is created if
needed but must not be a file. Every command checks its outputs before it loads a model or starts any work, so
that nothing is written by a run that is refused.

Its own module because every command writes files and the rules for overwriting them must be one.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .errors import CLIError, PathLike, user_errors

#: The kinds of file ssah-peft writes (``kind`` of :func:`check_output_file`), recognised by :func:`is_kind`.
UNIT_MAP = "unit map"
PARTIAL_SCORES = "partial score file"
PNG = "PNG figure"
FIGURE_DATA = "figure data file (CSV)"
PROBE_RESULT = "probe result"
ABLATION_TABLE = "ablation table"
SCAN_RESULT = "scan result"
EVAL_REPORT = "evaluation report"
EVAL_REPORT_PART = "evaluation report part (report.md, generations.jsonl)"
ANALYSIS_REPORT = "analysis report"

#: First columns of the CSV files that :mod:`ssah_peft.analysis.figures` writes next to each figure.
_FIGURE_CSV_HEADERS = ("layer,kind,", "before,after,", "series,block,", "ablated,num_units,", "criterion,fraction,")


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header, read without loading any tensor; a ``ValueError``
    naming the file when it is not a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= size <= 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (no valid header)")
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def _safetensors_format(path: Path) -> Optional[str]:
    try:
        return safetensors_metadata(path).get("format")
    except (OSError, ValueError):
        return None


def _json_object(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > 256_000_000:
            return {}
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _first_bytes(path: Path, count: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(count)
    except OSError:
        return b""


def _is_eval_report(path: Path) -> bool:
    from ..evaluate import REPORT_SCHEMA

    return _json_object(path).get("schema") == REPORT_SCHEMA


def _file_kinds() -> dict[str, Callable[[Path], bool]]:
    from ..scoring import PARTIAL_FILE_FORMAT
    from ..unit_map import FILE_FORMAT

    return {
        UNIT_MAP: lambda path: _safetensors_format(path) == FILE_FORMAT,
        PARTIAL_SCORES: lambda path: _safetensors_format(path) == PARTIAL_FILE_FORMAT,
        PNG: lambda path: _first_bytes(path, 8) == b"\x89PNG\r\n\x1a\n",
        FIGURE_DATA: lambda path: _first_bytes(path, 64).decode("utf-8", "replace").startswith(_FIGURE_CSV_HEADERS),
        PROBE_RESULT: lambda path: {"refusal", "compliance", "verdict"} <= _json_object(path).keys(),
        ABLATION_TABLE: lambda path: {"rows", "settings"} == _json_object(path).keys(),
        SCAN_RESULT: lambda path: {"criterion", "fractions", "chosen_fraction"} <= _json_object(path).keys(),
        EVAL_REPORT: _is_eval_report,
        # written together with report.json, which identifies them
        EVAL_REPORT_PART: lambda path: _is_eval_report(path.parent / "report.json"),
        ANALYSIS_REPORT: lambda path: _first_bytes(path, 20) == b"# Analysis report: ",
    }


def is_kind(path: PathLike, kinds: Union[str, Sequence[str]]) -> bool:
    """Whether the existing file ``path`` is a file ssah-peft writes of one of ``kinds``."""
    recognizers = _file_kinds()
    return any(recognizers[kind](Path(path)) for kind in ([kinds] if isinstance(kinds, str) else kinds))


def _ours(kinds: Union[str, Sequence[str]]) -> str:
    return "an ssah-peft " + " or ".join([kinds] if isinstance(kinds, str) else kinds)


def check_output_file(
    path: Optional[PathLike], option: str, kind: str, *, overwrite: bool, example: str = "out.safetensors"
) -> Optional[Path]:
    """A file a command will write: its folder exists and is writable, it is not a folder, and an existing file
    there is ``kind`` written by ssah-peft unless ``overwrite``. ``None`` passes through."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{option} {path} is a folder; give a file path such as {path / example}")
    folder = path.parent
    if not folder.is_dir():
        if folder.exists():
            raise CLIError(f"{option} {path}: {folder} is a file, not a folder")
        raise CLIError(
            f"{option} {path}: the folder {folder} does not exist; create it (mkdir -p {folder}) or choose another path"
        )
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{option} {path}: cannot write into the folder {folder} (permission denied)")
    if path.exists() and not overwrite and not is_kind(path, kind):
        raise CLIError(
            f"{option} {path} exists and is not {_ours(kind)}; not overwriting it: choose another path, or pass "
            "--overwrite to replace it"
        )
    return path


def check_output_dir(
    path: Optional[PathLike],
    option: str,
    files: Mapping[str, Union[str, Sequence[str]]] = {},
    *,
    overwrite: bool = False,
) -> Optional[Path]:
    """A folder a command will write ``files`` (name relative to it: kind) into: not a file, creatable or
    writable, and each of ``files`` that exists is of its kind unless ``overwrite``. ``None`` passes through."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path} is a file, not a folder; give a folder for the result files")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise CLIError(f"{option} {path}: cannot write into {existing} (permission denied)")
    foreign = []
    for name, kind in files.items():
        target = path / name
        if target.is_dir():
            raise CLIError(f"{option} {path}: {target} is a folder, where the file {name} is to be written")
        if target.exists() and not overwrite and not is_kind(target, kind):
            foreign.append(f"{target} (not {_ours(kind)})")
    if foreign:
        raise CLIError(
            f"{option} {path} holds files this command would overwrite: {', '.join(foreign)}; choose another "
            "folder, or pass --overwrite to replace them"
        )
    return path


def check_distinct(**paths: Optional[PathLike]) -> None:
    """No two output options name the same file."""
    seen: dict[str, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise CLIError(f"{seen[key]} and {option} both name {path}; give each output its own file")
        seen[key] = option


def check_input_file(path: PathLike, option: str) -> Path:
    """``path`` is an existing file (exit status 2 otherwise)."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{option} {path} does not exist")
    if not path.is_file():
        raise CLIError(f"{option} {path} is a folder; give a file")
    return path


def check_safetensors_input(path: PathLike, option: str) -> Path:
    """``path`` is an existing, readable safetensors file; errors name it."""
    path = check_input_file(path, option)
    with user_errors(path):
        safetensors_metadata(path)
    return path
