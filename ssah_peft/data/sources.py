"""User data sets: local files with a column mapping, and public sets from the Hugging Face hub.

Everything is brought to the record layout the built-in sets use, so calibration, fine-tuning and
evaluation code reads one layout: ``prompt`` (the user turn), optionally ``response`` (the assistant turn),
``answer`` (an exact-match target) and ``category``. All values are strings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

#: Fields of a record, in the order they are stored; only ``prompt`` is required.
FIELDS: tuple[str, ...] = ("prompt", "response", "answer", "category")

#: File suffix -> reader format.
FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _read_table(path: Path, file_format: str) -> pa.Table:
    """Read a whole file with pyarrow (no datasets cache: a local file needs no fingerprinted copy)."""
    if file_format == "json":
        import pyarrow.json as pajson

        return pajson.read_json(path)
    if file_format == "csv":
        import pyarrow.csv as pacsv

        return pacsv.read_csv(path)
    if file_format == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    raise ValueError(f"Unknown format {file_format!r}; expected one of {sorted(set(FORMATS.values()))}")


def load_local(
    path: Union[str, os.PathLike],
    columns: Optional[Mapping[str, str]] = None,
    file_format: Optional[str] = None,
) -> Dataset:
    """Load a JSONL/JSON-lines, CSV or Parquet file as records.

    Args:
        path: the file; its suffix gives the format unless ``file_format`` is given.
        columns: record field -> column of the file, e.g. ``{"prompt": "question", "response": "answer"}``.
            Fields not mapped are taken from a column of the same name when the file has one. Other
            columns are dropped.
        file_format: ``"json"`` (one JSON object per line), ``"csv"`` or ``"parquet"``.

    Returns:
        A ``datasets.Dataset`` with string columns among :data:`FIELDS` (missing values become ``""``).
    """
    path = Path(path)
    file_format = file_format or FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise ValueError(f"Cannot tell the format of {path}; pass file_format= one of {sorted(set(FORMATS.values()))}")
    table = _read_table(path, file_format)
    mapping = dict(columns or {})
    unknown = set(mapping) - set(FIELDS)
    if unknown:
        raise ValueError(f"Unknown record fields {sorted(unknown)}; fields are {FIELDS}")
    for name in FIELDS:
        if name not in mapping and name in table.column_names:
            mapping[name] = name
    missing = sorted(column for column in mapping.values() if column not in table.column_names)
    if missing:
        raise KeyError(f"{path} has no column(s) {missing}; its columns are {table.column_names}")
    if "prompt" not in mapping:
        raise KeyError(f"{path}: no 'prompt' column; map one with columns={{'prompt': '<column>'}}")
    strings = {
        name: pc.fill_null(pc.cast(table.column(mapping[name]), pa.string()), "") for name in FIELDS if name in mapping
    }
    return Dataset(pa.table(strings))


def _join(*parts: Optional[str]) -> str:
    return "\n\n".join(part.strip() for part in parts if part and part.strip())


def _alpaca(row: Mapping[str, Any]) -> dict[str, str]:
    return {"prompt": _join(row["instruction"], row["input"]), "response": row["output"], "category": "alpaca"}


def _dolly(row: Mapping[str, Any]) -> dict[str, str]:
    """Dolly's ``context`` (a reference text for closed QA, summarisation...) follows the instruction."""
    prompt = _join(row["instruction"], row["context"])
    return {"prompt": prompt, "response": row["response"], "category": row["category"]}


def _gsm8k(row: Mapping[str, Any]) -> dict[str, str]:
    """GSM8K solutions end in ``#### <number>`` and carry ``<<a*b=c>>`` calculator notes; both are rewritten
    to the built-in task's ``The answer is X.`` form so one answer extractor serves both."""
    working, _, final = row["answer"].rpartition("####")
    answer = final.strip().replace(",", "")
    working = re.sub(r"<<[^>]*>>", "", working).strip()
    response = f"{working}\nThe answer is {answer}."
    return {"prompt": row["question"], "response": response, "answer": answer, "category": "gsm8k"}


@dataclass(frozen=True)
class PublicDataset:
    """A public data set on the Hugging Face hub and how its rows become records."""

    path: str
    config: Optional[str]
    split: str
    to_record: Callable[[Mapping[str, Any]], dict[str, str]]
    about: str
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra ``datasets.load_dataset`` arguments the set needs."""


PUBLIC_DATASETS: dict[str, PublicDataset] = {
    "advbench": PublicDataset(
        "walledai/AdvBench",
        None,
        "train",
        lambda row: {"prompt": row["prompt"], "category": "advbench"},
        "520 harmful behaviours (Zou et al. 2023); prompts only, its compliance targets are dropped.",
    ),
    "hex_phi": PublicDataset(
        "LLM-Tuning-Safety/HEx-PHI",
        None,
        "train",
        lambda row: {"prompt": row["prompt"], "category": "hex_phi"},
        "330 harmful instructions in 11 categories (Qi et al. 2023); gated: accept its terms on the hub and log in.",
        {"data_files": "category_*.csv", "header": None, "column_names": ["prompt"]},  # header-less CSV files
    ),
    "alpaca": PublicDataset(
        "tatsu-lab/alpaca",
        None,
        "train",
        _alpaca,
        "52k instruction-following demonstrations (Taori et al. 2023).",
    ),
    "dolly": PublicDataset(
        "databricks/databricks-dolly-15k",
        None,
        "train",
        _dolly,
        "15k human-written instruction/response pairs (Databricks 2023).",
    ),
    "gsm8k": PublicDataset(
        "openai/gsm8k",
        "main",
        "test",
        _gsm8k,
        "Grade-school math word problems (Cobbe et al. 2021) with an exact-match numeric answer; "
        "split 'train' or 'test'.",
    ),
}


def load_public(
    name: str, split: Optional[str] = None, limit: Optional[int] = None, **load_dataset_kwargs: Any
) -> Dataset:
    """Download a public data set (see :data:`PUBLIC_DATASETS`) and map it to records.

    Needs network access to the hub (or a warm ``datasets`` cache). ``limit`` keeps the first rows;
    ``load_dataset_kwargs`` go to ``datasets.load_dataset`` (``revision=``, ``token=``, ``data_files=``...).
    """
    from datasets import load_dataset

    if name not in PUBLIC_DATASETS:
        raise KeyError(f"Unknown public data set {name!r}; known: {sorted(PUBLIC_DATASETS)}")
    spec = PUBLIC_DATASETS[name]
    kwargs = {**spec.load_kwargs, **load_dataset_kwargs}
    dataset = load_dataset(spec.path, spec.config, split=split or spec.split, **kwargs)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.map(spec.to_record, remove_columns=dataset.column_names)
