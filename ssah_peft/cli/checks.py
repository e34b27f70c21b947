"""Checks and error reports shared by the ``ssah-peft`` commands (command-line side only).

Every command checks its options, input files and output paths before it loads a model or starts any work, so
that a mistake costs seconds, not the scoring pass, and nothing is written by a run that is refused.

**User errors and bugs.** A mistake the user can fix raises :class:`CLIError`; :func:`run_command` prints it as
one line, ``ssah-peft: error: MESSAGE``, and exits with its status: 2 for options, paths and missing files (as
argparse does), 1 for the contents of an input (a file that is not what it should be, a unit map of another
model). Errors of the library (``ValueError``, ``OSError``, ``SafetensorError``, ...) become user errors only
where a command reads the user's files or checks them against a model (:func:`user_errors`), and then name the
file; anywhere else an exception is a bug and keeps its traceback. ``SSAH_PEFT_TRACEBACK=1`` shows the
traceback of user errors too.

**Outputs.** A command replaces an existing file only when the file is one ssah-peft writes of the same kind (a
unit map with a unit map, a partial score file with a partial score file, ``probe.json`` with a probe result,
a PNG figure with a PNG, ...; recognized by its contents, not its name) or when ``--overwrite`` is given. The
folder of an output file must exist; an output folder (``--out-dir``, ``--out``, ``--run-dir``) is created if
needed but must not be a file.

**Model sources.** ``--model`` (and ``--adapter``, ``--judge``) names an embedded model, a local folder or a
Hugging Face hub id. A value is a local path, and an error names it when it does not exist, if it exists, starts
like a path (``/``, ``./``, ``../``, ``~``), contains a backslash, has more than one ``/``, ends with ``/``,
is not a valid hub id, or if its first part is a folder in the current directory (``runs/model`` where
``runs/`` exists). Anything else (``owner/name``, or a bare name such as ``gpt2``) is left to the hub, as
before. A local folder must hold the checkpoint's ``config.json`` (an adapter's ``adapter_config.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]

#: Environment variable that makes user errors show their traceback as well.
TRACEBACK_ENV = "SSAH_PEFT_TRACEBACK"

#: Help of every ``--model`` option.
MODEL_HELP = (
    "embedded model name (smollm2-135m-instruct), local checkpoint folder, or hub id owner/name; a value that "
    "starts with / ./ ../ ~, has more than one '/', or whose first part is a folder here is a local path"
)


class CLIError(Exception):
    """A mistake the user can fix; reported as ``ssah-peft: error: MESSAGE`` with exit ``status``, no traceback."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``args.handler(args)``; a :class:`CLIError` exits as argparse does, with ``prog: error: message``."""
    try:
        return int(args.handler(args))
    except CLIError as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        parser.exit(error.status, f"{parser.prog}: error: {error}\n")


# ----------------------------------------------------------------------------------------------------
# Help text
# ----------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to every option's help that does not state its default itself, or ``(required)``
    to a required option's."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return text if "required" in text else f"{text} (required)"
        if "default" in text.lower() or "required" in text:
            return text
        default = action.default
        if default is None:
            shown = "none"
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default))
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks."""


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace existing output files even if ssah-peft did not write them (without it, only files of the "
        "kind being written are replaced)",
    )


# ----------------------------------------------------------------------------------------------------
# Option types (argparse reports their errors with the option's name, exit status 2)
# ----------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """``type=`` for counts and sizes: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """``type=`` for fractions of all units: a number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}")
    return value


def positive_fraction(text: str) -> float:
    """``type=`` for fractions to prune or scan: a number in (0, 1]."""
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_unit_fractions(scu: float, ucu: float, ru: float, composite_fraction: float = 0.0) -> None:
    """The group sizes of a classification (each already in [0, 1] by :func:`fraction`) fit into all units."""
    total = scu + ucu + ru
    if total > 1.0 + 1e-9:
        raise CLIError(
            f"--scu + --ucu + --ru = {scu} + {ucu} + {ru} = {total:g} exceeds 1 (all units); make the groups smaller"
        )
    if composite_fraction > 1.0 - total + 1e-9:
        raise CLIError(
            f"--composite-fraction {composite_fraction} exceeds the share of composite units, 1 - (--scu + --ucu + "
            f"--ru) = {1.0 - total:g}; lower it or make the groups smaller"
        )


# ----------------------------------------------------------------------------------------------------
# Reading the user's files
# ----------------------------------------------------------------------------------------------------


def _reading_errors() -> tuple[type[BaseException], ...]:
    """Errors of reading a file or checking it against a model: user errors inside :func:`user_errors`."""
    from safetensors import SafetensorError

    return (ValueError, TypeError, KeyError, OSError, SafetensorError)


@contextmanager
def user_errors(name: PathLike, *, status: int = 1, also_named: Iterable[PathLike] = ()) -> Iterator[None]:
    """Report the errors of reading ``name`` (a file, folder or model) as a :class:`CLIError` ``name: message``.

    The prefix is left out when the message already names ``name`` or one of ``also_named``.
    """
    try:
        yield
    except CLIError:
        raise
    except _reading_errors() as error:
        text = describe_error(error)
        if not any(str(n) in text for n in (name, *also_named)):
            text = f"{name}: {text}"
        raise CLIError(text, 2 if isinstance(error, FileNotFoundError) else status) from error


def describe_error(error: BaseException) -> str:
    """A one-line description of a reading error, without Python's error codes."""
    from safetensors import SafetensorError

    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename} does not exist"
    if isinstance(error, IsADirectoryError) and error.filename:
        return f"{error.filename} is a folder, not a file"
    if isinstance(error, PermissionError) and error.filename:
        return f"permission denied: {error.filename}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    if isinstance(error, SafetensorError):
        return f"not a readable safetensors file ({error})"
    if isinstance(error, KeyError):
        return f"missing entry {error.args[0]!r}" if error.args else "missing entry"
    return str(error) or type(error).__name__


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


def load_unit_map(path: PathLike, option: str) -> Any:
    """The :class:`~ssah_peft.UnitMap` of a file given as ``option``; every problem with the file names it."""
    from ..unit_map import UnitMap

    check_safetensors_input(path, option)
    with user_errors(path):
        return UnitMap.load(path)


def decode_utf8(data: bytes, where: str, line: int = 1) -> str:
    """``data`` as UTF-8 text; a ``ValueError`` naming ``where`` and the line of the first bad byte otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line += data.count(b"\n", 0, error.start)
        raise ValueError(
            f"{where}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file with UTF-8 encoding"
        ) from None


def read_text(path: PathLike) -> str:
    """The UTF-8 text of a file; errors name the file (and the line of a byte that is not UTF-8)."""
    return decode_utf8(Path(path).read_bytes(), str(path))


def jsonl_records(path: PathLike) -> list[tuple[str, Any]]:
    """``(where, record)`` for every non-blank line of a JSONL file; ``where`` is ``path:line``. A line that is
    not UTF-8 or not JSON raises a ``ValueError`` naming the file and line."""
    records = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = decode_utf8(raw, str(path), number)
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte order mark some editors write
            if line.strip():
                try:
                    records.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
    return records


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


# ----------------------------------------------------------------------------------------------------
# Files ssah-peft writes, recognized by their contents
# ----------------------------------------------------------------------------------------------------

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
    path: Optional[PathLike], option: str, files: Mapping[str, Union[str, Sequence[str]]] = {}, *,
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


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------

_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def _path_reason(name: str) -> Optional[str]:
    """Why ``name`` is read as a local path rather than a hub id (module docstring), or None for a hub id."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name:
        return "it starts like a path"
    if name.endswith("/"):
        return "it ends with '/'"
    parts = name.split("/")
    if len(parts) > 2:
        return "hub ids have at most one '/'"
    if not all(_HUB_PART.fullmatch(part) and "--" not in part and ".." not in part for part in parts):
        return "it is not a valid hub id"
    if len(parts) == 2 and Path(parts[0]).is_dir():
        return f"the folder {parts[0]}/ exists here"
    return None


def check_model_source(
    name: Optional[str], option: str = "--model", *, marker: str = "config.json", what: str = "model checkpoint",
    embedded: Iterable[str] = (),
) -> None:
    """``name`` is an embedded model, a hub id, or an existing local folder holding ``marker`` (module docstring);
    a local checkpoint's weights must not be an ssah-peft file (a unit map written over ``model.safetensors``)."""
    if name is None or name in set(embedded):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{option} {name} is a file; give the {what} folder (with {marker})")
        if not (path / marker).is_file():
            raise CLIError(
                f"{option} {name} is a folder without {marker}, not a {what} (as save_pretrained writes); "
                "give the folder that holds it"
            )
        for weights in sorted(path.glob("*.safetensors")):
            with user_errors(weights):
                safetensors_metadata(weights)  # a damaged file is named here, not deep inside from_pretrained
            if is_kind(weights, (UNIT_MAP, PARTIAL_SCORES)):
                raise CLIError(
                    f"{option} {name}: {weights} is an ssah-peft unit map or partial score file, not model weights "
                    "(an output written into the checkpoint?); restore the checkpoint's weights"
                )
        return
    reason = _path_reason(name)
    if reason is not None:
        raise CLIError(
            f"{option} {name} does not exist (read as a local path because {reason}; hub ids look like owner/name)"
        )


@contextmanager
def loading(name: str, option: str = "--model") -> Iterator[None]:
    """Report a model, adapter or judge that cannot be loaded (missing hub repo, no network, broken files)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as error:
        raise CLIError(f"{option} {name} could not be loaded: {describe_error(error)}", 1) from error
