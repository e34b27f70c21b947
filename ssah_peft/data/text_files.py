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
