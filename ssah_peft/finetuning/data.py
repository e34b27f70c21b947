"""The user's fine-tuning data: JSONL, CSV or Parquet files (or a hub data set) read into prompt/response records.

A module of its own because every way a user may hand over examples must end in the same records, so that the
loss, the calibration sample and the perplexity see the same text whatever the file looked like. Two shapes are
read:

* **prompt/response**: one column with the user turn and one with the answer (names set by ``prompt_column`` /
  ``response_column``; an optional ``system`` column becomes the system turn);
* **chat records**: a ``messages`` column holding a list of ``{"role", "content"}`` turns, as TRL users have them:
  an optional system turn, one user turn and one assistant turn. Such a record becomes the same prompt/response
  record, so both shapes give the same tokens.

Every problem is a ``ValueError`` that names the file and, where there is one, the line: a malformed JSON line, a
byte that is not UTF-8, missing or misnamed columns (with the columns that were found), a value that is not text,
data that is empty or only blank. Records whose prompt or response is blank are skipped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data.text_files import decode_utf8, jsonl_records

#: File suffixes read by :func:`read_examples`, by format.
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
#: The column of chat records.
MESSAGES = "messages"


@dataclass
class Examples:
    """Prompt/response records read from one source, and how they were read."""

    source: str
    records: list[dict[str, str]]
    """``{"prompt", "response"}`` and, where the data had one, ``"system"``."""
    shape: str
    """``"prompt/response"`` or ``"chat"``."""
    skipped_blank: int = 0
    """Records left out because their prompt or response was blank."""
    columns: list[str] = field(default_factory=list)

    def sha256(self) -> str:
        """Hash of the records' content, in order: a run directory is pinned to the data it trained on."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
        return digest.hexdigest()


def read_examples(
    source: str,
    prompt_column: str = "prompt",
    response_column: str = "response",
    split: Optional[str] = None,
    what: str = "data",
) -> Examples:
    """The examples of a JSONL/CSV/Parquet file, or of the hub data set ``source`` with ``split``.

    ``what`` names the source in errors (``"--data"``). See the module docstring for the shapes and errors.
    """
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_file(path)
    elif split is not None and not path.exists():
        rows = _read_hub(source, split)
    elif path.is_dir():
        raise ValueError(f"{what} {source} is a folder; give a .jsonl, .csv or .parquet file")
    else:
        raise FileNotFoundError(
            f"{what} {source} does not exist (a file .jsonl/.csv/.parquet, or a hub data set id with --split)"
        )
    return _examples(str(source), rows, prompt_column, response_column, what)


def _read_file(path: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` for every row of a file; ``where`` is ``path:line`` (JSONL, CSV) or ``path[row]``."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown data format {path.suffix!r}; give a .jsonl, .csv or .parquet file")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises its own error types for damaged files
            raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
        return [(f"{path}[{i}]", row) for i, row in enumerate(table.to_pylist())]
    if kind == "jsonl":
        return jsonl_records(path)
    text = decode_utf8(path.read_bytes(), str(path)).removeprefix("\ufeff")  # a byte order mark some editors write
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:
                raise ValueError(f"{path}:{reader.line_num}: more fields than the header has columns")
            rows.append((f"{path}:{reader.line_num}", row))
    except csv.Error as error:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None
    return rows


def _read_hub(source: str, split: str) -> list[tuple[str, Any]]:
    from datasets import load_dataset

    dataset = load_dataset(source, split=split)
    return [(f"{source}[{split}][{i}]", row) for i, row in enumerate(dataset)]


def _examples(
    source: str, rows: Sequence[tuple[str, Any]], prompt_column: str, response_column: str, what: str
) -> Examples:
    if not rows:
        raise ValueError(f"{what} {source} holds no examples (it is empty)")
    columns: list[str] = []
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: expected an object with named fields, got {type(row).__name__}")
        columns.extend(c for c in row if c not in columns)
    chat = MESSAGES in columns and not {prompt_column, response_column} <= set(columns)
    if not chat and not {prompt_column, response_column} <= set(columns):
        missing = [c for c in (prompt_column, response_column) if c not in columns]
        raise ValueError(
            f"{what} {source} has no {' and no '.join(map(repr, missing))} column (nor {MESSAGES!r} chat records); "
            f"columns found: {', '.join(map(repr, columns)) or 'none'}. Name the columns with --prompt-column and "
            "--response-column, or give chat records with a 'messages' list"
        )
    records, blank = [], 0
    for where, row in rows:
        record = (
            _from_chat(where, row.get(MESSAGES)) if chat else _from_columns(where, row, prompt_column, response_column)
        )
        if record is None or not record["prompt"].strip() or not record["response"].strip():
            blank += 1
            continue
        records.append(record)
    if not records:
        raise ValueError(f"{what} {source}: all {len(rows)} examples have a blank prompt or response")
    return Examples(source, records, "chat" if chat else "prompt/response", blank, columns)


def _from_columns(where: str, row: Mapping[str, Any], prompt_column: str, response_column: str) -> Optional[dict]:
    record = {}
    for key, column in (("prompt", prompt_column), ("response", response_column), ("system", "system")):
        value = row.get(column)
        if value is None:
            if key != "system":
                return None  # a missing value in this row: blank
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}: column {column!r} holds {type(value).__name__} {value!r}, expected text")
        if key != "system" or value.strip():
            record[key] = value
    return record


def _from_chat(where: str, messages: Any) -> Optional[dict]:
    """A chat record (optional system turn, one user turn, one assistant turn) as a prompt/response record."""
    if messages is None:
        return None
    shape = "expected 'messages' to be [system?, user, assistant] turns with 'role' and 'content' text"
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError(f"{where}: {shape}, got {type(messages).__name__}")
    turns = []
    for turn in messages:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str):
            raise ValueError(f"{where}: {shape}; a turn is {turn!r}")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: the {turn['role']} turn's content is not text ({turn.get('content')!r})")
        turns.append((turn["role"], turn["content"]))
    roles = [role for role, _ in turns]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(
            f"{where}: {shape} (roles found: {', '.join(roles) or 'none'}); multi-turn conversations are not "
            "supported yet: split them into one exchange per record"
        )
    record = {"prompt": turns[-2][1], "response": turns[-1][1]}
    if roles[0] == "system" and turns[0][1].strip():
        record["system"] = turns[0][1]
    return record


def read_prompts(source: str, column: str = "prompt") -> list[dict[str, str]]:
    """Prompts (``{"prompt": text}``) of a JSONL/CSV/Parquet file with a ``column`` column, e.g. harmful prompts
    for the attack success rate; errors as :func:`read_examples`."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist")
    rows = _read_file(path)
    prompts = []
    for where, row in rows:
        if not isinstance(row, Mapping) or column not in row:
            found = ", ".join(map(repr, row)) if isinstance(row, Mapping) else type(row).__name__
            raise ValueError(f"{where}: no {column!r} field (found: {found})")
        if not isinstance(row[column], str):
            raise ValueError(f"{where}: {column!r} is not text ({row[column]!r})")
        if row[column].strip():
            prompts.append({"prompt": row[column], "category": str(row.get("category") or "")})
    if not prompts:
        raise ValueError(f"prompt file {source} holds no non-blank prompts")
    return prompts
