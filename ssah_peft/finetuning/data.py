"""The user's fine-tuning data: JSONL, CSV or Parquet files (or a hub data set) read into prompt/response records.

A module of its own because every way a user may hand over examples must end in the same records, so that the
loss, the calibration sample and the perplexity see the same text whatever the file looked like. Two shapes are
read:

* **prompt/response**: one column with the user turn and one with the answer (names set by ``prompt_column`` /
  ``response_column``; an optional ``system`` column becomes the system turn);
* **chat records**: a ``messages`` column holding a list of ``{"role", "content"}`` turns, as TRL users have them:
  an optional system turn, then user and assistant turns in turn, ending with an assistant turn. Such a record
  becomes a prompt/response record of its last exchange, the turns before it kept as its ``history``
  (:func:`ssah_peft.chat.record_messages` renders them back), so a single exchange gives the same tokens in both
  shapes and every assistant turn of a conversation is trained.

Every problem is a ``ValueError`` that names the file and, where there is one, the line: a malformed JSON line, a
byte that is not UTF-8, missing or misnamed columns (with the columns that were found), a row missing a field or
holding null, a CSV row with fewer or more fields than its header, a file mixing the two shapes, a value that is not
text, data that is empty or only blank. Nothing is dropped without a count: records with a blank turn (prompt,
response, or an earlier turn of a conversation) are skipped and listed (:attr:`Examples.blank`), and
:func:`training_set` lists the examples ``max_length`` truncates and refuses one it leaves no response token of,
unless told to skip such examples.
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
from ..training import record_tokens, response_loss_dataset

#: File suffixes read by :func:`read_examples`, by format.
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
#: The column of chat records.
MESSAGES = "messages"
#: Locations shown in a message or report before "and N more".
SHOWN = 5


@dataclass
class Examples:
    """Prompt/response records read from one source, and how they were read."""

    source: str
    records: list[dict[str, Any]]
    """``{"prompt", "response"}`` and, where the data had them, ``"system"`` and a conversation's earlier turns
    (``"history"``)."""
    shape: str
    """``"prompt/response"`` or ``"chat"`` (``"prompts"``: prompts alone, :func:`read_prompts`)."""
    blank: list[str] = field(default_factory=list)
    """Where (``path:line``, ``path[row]``) each record left out because its prompt or response was blank was."""
    columns: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    """Where each of :attr:`records` was read, in order: errors about a record name its line. Default:
    ``source[i]``."""

    def __post_init__(self) -> None:
        if not self.locations:
            self.locations = [f"{self.source}[{i}]" for i in range(len(self.records))]
        if len(self.locations) != len(self.records):
            raise ValueError(f"{len(self.records)} records but {len(self.locations)} locations")

    def sha256(self) -> str:
        """Hash of the records' content, in order: a run directory is pinned to the data it trained on."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
        return digest.hexdigest()

    def hold_out(self, every: int) -> tuple[Examples, list[dict[str, str]]]:
        """(the examples left to train on, the held-out records): every ``every``-th record is held out."""
        kept = [i for i in range(len(self.records)) if i % every != every - 1]
        held_out = [r for i, r in enumerate(self.records) if i % every == every - 1]
        records, locations = [self.records[i] for i in kept], [self.locations[i] for i in kept]
        return Examples(self.source, records, self.shape, self.blank, self.columns, locations), held_out


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
            if None in row.values():
                found = sum(value is not None for value in row.values())
                raise ValueError(
                    f"{path}:{reader.line_num}: {found} field{'s' * (found != 1)}, the header has {len(row)} columns "
                    f"({', '.join(reader.fieldnames or [])})"
                )
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
    if MESSAGES not in columns and not {prompt_column, response_column} <= set(columns):
        missing = [c for c in (prompt_column, response_column) if c not in columns]
        raise ValueError(
            f"{what} {source} has no {' and no '.join(map(repr, missing))} column (nor {MESSAGES!r} chat records); "
            f"columns found: {', '.join(map(repr, columns)) or 'none'}. Name the columns with --prompt-column and "
            "--response-column, or give chat records with a 'messages' list"
        )
    first_where, shape = rows[0][0], _shape(*rows[0], prompt_column, response_column)
    records, locations, blank = [], [], []
    for where, row in rows:
        row_shape = _shape(where, row, prompt_column, response_column)
        if row_shape != shape:
            raise ValueError(
                f"{where}: a {row_shape} record, but {first_where} is a {shape} record; give one shape per file"
            )
        record = (
            _from_chat(where, row[MESSAGES])
            if shape == "chat"
            else _from_columns(where, row, prompt_column, response_column)
        )
        if is_blank(record):
            blank.append(where)
            continue
        records.append(record)
        locations.append(where)
    if not records:
        raise ValueError(f"{what} {source}: all {len(rows)} examples have a blank prompt or response")
    return Examples(str(source), records, shape, blank, columns, locations)


def _shape(where: str, row: Mapping[str, Any], prompt_column: str, response_column: str) -> str:
    """``"chat"`` or ``"prompt/response"``: what a row holds (a null is nothing); a ``ValueError`` for both or none."""
    chat = row.get(MESSAGES) is not None
    columns = [c for c in (prompt_column, response_column) if row.get(c) is not None]
    if chat and columns:
        raise ValueError(f"{where}: holds both {MESSAGES!r} and {columns[0]!r}; give one shape per record")
    if chat:
        return "chat"
    if not columns:
        found = ", ".join(f"{c!r}" + (" (null)" if row[c] is None else "") for c in row) or "none"
        raise ValueError(
            f"{where}: no {prompt_column!r} and {response_column!r} fields, nor {MESSAGES!r} (found: {found})"
        )
    return "prompt/response"


def _from_columns(where: str, row: Mapping[str, Any], prompt_column: str, response_column: str) -> dict[str, str]:
    record = {}
    for key, column in (("prompt", prompt_column), ("response", response_column), ("system", "system")):
        value = row.get(column)
        if value is None:
            if key != "system":
                state = "is null" if column in row else "is missing"
                raise ValueError(f"{where}: field {column!r} {state} (found: {', '.join(map(repr, row))})")
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}: column {column!r} holds {type(value).__name__} {value!r}, expected text")
        if key != "system" or value.strip():
            record[key] = value
    return record


def _from_chat(where: str, messages: Any) -> dict[str, Any]:
    """A chat record (an optional system turn, then user and assistant turns in turn, ending with the assistant's)
    as a prompt/response record: its last exchange, the turns before it as ``history``."""
    shape = "expected 'messages' to be [system?, user, assistant, (user, assistant)...] turns with 'role' and 'content'"
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError(f"{where}: {shape}, got {type(messages).__name__}")
    turns = []
    for turn in messages:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str):
            raise ValueError(f"{where}: {shape}; a turn is {turn!r}")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: the {turn['role']} turn's content is not text ({turn.get('content')!r})")
        turns.append({"role": turn["role"], "content": turn["content"]})
    system = turns.pop(0)["content"] if turns and turns[0]["role"] == "system" else None
    roles = [turn["role"] for turn in turns]
    if not roles or len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        found = ", ".join(([] if system is None else ["system"]) + roles) or "none"
        raise ValueError(f"{where}: {shape} (roles found: {found})")
    record: dict[str, Any] = {"prompt": turns[-2]["content"], "response": turns[-1]["content"]}
    if len(turns) > 2:
        record["history"] = turns[:-2]
    if system is not None and system.strip():
        record["system"] = system
    return record


def is_blank(record: Mapping[str, Any]) -> bool:
    """Whether a record has a blank turn (its prompt, its response or an earlier turn): trained as it is, it would
    teach empty answers, or answers to nothing."""
    texts = [record["prompt"], record["response"], *(turn["content"] for turn in record.get("history") or ())]
    return any(not text.strip() for text in texts)


@dataclass
class TrainingSet:
    """The tokenized examples a job trains on, and those ``max_length`` cut."""

    dataset: Any
    """A ``datasets.Dataset`` of ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside responses)."""
    truncated: list[str] = field(default_factory=list)
    """Where each example trained with the end of its response cut away by ``max_length`` was."""
    skipped: list[str] = field(default_factory=list)
    """Where each example left out because ``max_length`` left none of its response was (``skip_truncated``)."""


def training_set(tokenizer: Any, examples: Examples, max_length: int, skip_truncated: bool = False) -> TrainingSet:
    """The examples tokenized for a completion-only loss, at most ``max_length`` tokens each.

    An example whose response ``max_length`` cuts away entirely would train nothing while counting as trained: it is
    a ``ValueError`` naming it (and how many more), unless ``skip_truncated`` leaves such examples out; the others
    that lose the end of their response are listed in :attr:`TrainingSet.truncated`.
    """
    kept, truncated, cut_away = [], [], []
    for record, where in zip(examples.records, examples.locations):
        ids, is_response = record_tokens(tokenizer, record, max_length + 1)  # a token past max_length: was it cut?
        if not any(is_response[:max_length]):
            cut_away.append(where)
            continue
        kept.append((ids[:max_length], is_response[:max_length]))
        if len(ids) > max_length:
            truncated.append(where)
    if cut_away and not kept:
        raise ValueError(
            f"max_length {max_length} (--max-length) cuts every example before its response: no token would be "
            "trained; raise it"
        )
    if cut_away and not skip_truncated:
        raise ValueError(
            f"{cut_away[0]}: max_length {max_length} (--max-length) leaves no token of the response, the prompt fills "
            f"it; {len(cut_away)} of {len(examples.records)} examples are cut so ({listing(cut_away)}). Raise "
            "max_length, or leave them out with skip_truncated (--skip-truncated)"
        )
    return TrainingSet(response_loss_dataset(kept), truncated, cut_away)


def listing(locations: Sequence[str], shown: int = SHOWN) -> str:
    """The first ``shown`` of ``locations``, and how many more."""
    more = len(locations) - shown
    return ", ".join(locations[:shown]) + (f" and {more} more" if more > 0 else "")


def read_prompts(source: str, column: str = "prompt") -> Examples:
    """The prompts (records ``{"prompt", "category"}``, shape ``"prompts"``) of a JSONL/CSV/Parquet file with a
    ``column`` column, e.g. harmful prompts for the attack success rate; blank prompts are left out and listed
    (:attr:`Examples.blank`); errors as :func:`read_examples`."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist")
    rows = _read_file(path)
    prompts, locations, blank = [], [], []
    for where, row in rows:
        if not isinstance(row, Mapping) or column not in row:
            found = ", ".join(map(repr, row)) if isinstance(row, Mapping) else type(row).__name__
            raise ValueError(f"{where}: no {column!r} field (found: {found})")
        if not isinstance(row[column], str):
            raise ValueError(f"{where}: {column!r} is not text ({row[column]!r})")
        if not row[column].strip():
            blank.append(where)
            continue
        prompts.append({"prompt": row[column], "category": str(row.get("category") or "")})
        locations.append(where)
    if not prompts:
        raise ValueError(f"prompt file {source} holds no non-blank prompts")
    return Examples(str(source), prompts, "prompts", blank, [column], locations)
