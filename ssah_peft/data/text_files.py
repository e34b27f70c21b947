"""Reading the user's text files: UTF-8 with the line of a bad byte named, and JSONL records with their line.

Its own module because the CLI (calibration pairs, prompts, chat templates) and fine-tuning (the user's training
data) read the same kinds of files and must report the same problems the same way: ``data.jsonl:3: not valid JSON``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, Path]


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
    not UTF-8, not JSON or holds text that is no character raises a ``ValueError`` naming the file and line."""
    records = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = decode_utf8(raw, str(path), number)
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte order mark some editors write
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: {_not_json(path, line, error, not records)}") from None
                if "\\u" in line:  # an escape may name half a surrogate pair, which is no character
                    _check_characters(record, f"{path}:{number}")
                records.append((f"{path}:{number}", record))
    return records


def _not_json(path: PathLike, line: str, error: json.JSONDecodeError, first: bool) -> str:
    """What is wrong with a line that is not JSON; a first line whose value goes on past its end is a JSON file
    written over several lines (a pretty-printed ``.json`` array), which JSON Lines is not."""
    if first and line.lstrip()[:1] in ("[", "{") and error.pos >= len(line.rstrip()):
        convert = ".[]" if line.lstrip().startswith("[") else "."
        return (
            "not JSON Lines: a JSON value starts here and goes on over the next lines (a pretty-printed .json "
            f"file?); give one JSON object per line, e.g. jq -c '{convert}' {path} > data.jsonl"
        )
    return f"not valid JSON ({error})"


def _check_characters(record: Any, where: str) -> None:
    """Refuse a record whose text holds a lone surrogate (``\\ud800`` with no other half): it cannot be encoded,
    so the tokenizer would fail on it far from the file."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        escape = f"\\u{ord(error.object[error.start]):04x}"
        raise ValueError(
            f"{where}: holds the escape {escape}, half of a UTF-16 surrogate pair without its other half, which is "
            "no character; remove it or give the whole pair"
        ) from None
