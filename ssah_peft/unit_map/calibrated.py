"""A unit map from calibration data: the one path from (prompt, response) records to a :class:`~.UnitMap`.

``ssah-peft score``, the ``finetune`` job and the demo's measurements all score a model on a safety and a utility
calibration set and classify its units. They do it here, so that a map records the same description of its
calibration data whoever made it (:func:`calibration_metadata`: the data's name, size and sha256, which tokens were
scored, the length cut, the chat template and system prompt, and where the model came from when it was loaded by
name), and so that sharded scoring (``--shard``) and scoring under ``torchrun`` / ``accelerate launch`` (every
process scores its share, the statistics are merged across the processes) are the same code as a single run:

* :func:`calibration_statistics`: the mergeable statistics of both sets (what a shard saves);
* :func:`unit_map_from_calibration`: those statistics as scores, classified into a map.

A module of its own because it is the only part of :mod:`ssah_peft.unit_map` that runs a model: the rest reads
and writes maps.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ..scoring import (
    CalibrationPair,
    ScoringMethod,
    TokenSelection,
    UnitStatistics,
    build_calibration_batches,
    calibration_data_hash,
    score_units,
    unit_statistics,
)
from .classification import UnitMap

#: The two calibration sets of a map, in the order :meth:`UnitMap.from_scores` takes their scores.
CALIBRATION_SETS = ("safety", "utility")


@dataclass(frozen=True)
class CalibrationSet:
    """One calibration data set: its name as a map records it (a file or a built-in set) and its pairs."""

    source: str
    pairs: Sequence[CalibrationPair]
    notes: Mapping[str, Any] = field(default_factory=dict)
    """Further facts about the data recorded with it, e.g. ``{"half": 0}`` for every other pair of a set."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How the calibration pairs become scored batches, and the scorer (:func:`ssah_peft.build_calibration_batches`,
    :func:`ssah_peft.score_units`)."""

    method: ScoringMethod = "variance"
    tokens: TokenSelection = "response"
    batch_size: int = 8
    """Examples per forward pass; batching does not change the scores."""
    max_length: int = 512
    chat_template: Optional[str] = None
    """A template overriding the tokenizer's (its text); None: the tokenizer's."""
    chat_template_name: str = "tokenizer"
    """How the map names the template: a file, ``"plain"``, or ``"tokenizer"`` for the tokenizer's own."""
    system_prompt: Optional[str] = None


def calibration_metadata(
    data: CalibrationSet, settings: CalibrationSettings, model_source: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """What a map records about one calibration set (besides the scorer and token counts that every score
    carries): the schema of every map made by :func:`unit_map_from_calibration`.

    ``data_sha256`` is the :func:`ssah_peft.calibration_data_hash` of the whole set, so that shards of changed data
    are not merged and two maps can be told apart by their data. ``model_source`` (``model``, ``dtype``,
    ``load_in_4bit``) is recorded when the model was loaded by name; the map's fingerprint identifies it in any case.
    """
    return {
        "data": data.source,
        **dict(data.notes),
        "num_examples": len(data.pairs),
        "data_sha256": calibration_data_hash(data.pairs),
        "tokens": settings.tokens,
        "max_length": settings.max_length,
        "chat_template": settings.chat_template_name,
        "system_prompt": settings.system_prompt,
        **dict(model_source or {}),
    }


class NoTokensToScore(ValueError):
    """Records of a calibration set that leave no token to score: the length cut ends within their prompt (with
    ``tokens="response"``). They would add nothing while counted as scored, so they are refused, naming them."""

    def __init__(self, source: str, records: list[int], settings: CalibrationSettings) -> None:
        self.source, self.records, self.settings = source, records, settings
        super().__init__(
            f"{source}: record(s) {self.listed()} leave no token to score (tokens={settings.tokens!r}): max_length "
            f"{settings.max_length} cuts them off within the prompt; raise max_length, or shorten or leave out these "
            "records"
        )

    def listed(self) -> str:
        """The records (1-based), the first ten and how many more."""
        more = len(self.records) - 10
        return ", ".join(map(str, self.records[:10])) + (f" and {more} more" if more > 0 else "")


@contextmanager
def launched_process_group() -> Iterator[tuple[int, int]]:
    """``(rank, world size)`` of this process among those a launcher started.

    ``torchrun`` and ``accelerate launch`` start every process with ``WORLD_SIZE``, ``RANK`` and a rendezvous
    address in the environment; the group is joined from them (nccl with CUDA, each process on GPU
    ``LOCAL_RANK``; gloo on CPU) and left on exit. A group the caller initialized is used and kept; a single
    process is ``(0, 1)``.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, 1
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _group_rank() -> tuple[int, int]:
    """``(rank, world size)`` of an initialized ``torch.distributed`` group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def calibration_statistics(
    model: nn.Module,
    tokenizer: Any,
    safety: CalibrationSet,
    utility: CalibrationSet,
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    shard: Optional[tuple[int, int]] = None,
    model_source: Optional[Mapping[str, Any]] = None,
    show_progress: bool = True,
) -> dict[str, UnitStatistics]:
    """The statistics of one scoring pass over each calibration set, ``{"safety": ..., "utility": ...}``.

    In a ``torch.distributed`` group (:func:`launched_process_group`) every process scores pairs ``rank``,
    ``rank + world``, ... and the statistics are merged across the processes, so each holds those of the whole
    sets; otherwise ``shard=(rank, count)`` scores only that share, for independent jobs whose statistics are saved
    (:func:`ssah_peft.save_partial_scores`) and merged later. Whole pairs go to a shard: batching and padding never
    change the statistics, so the shards' batches need not line up with those of a single run. Every record of a
    share must leave a token to score (:class:`NoTokensToScore`, raised before the model runs).
    """
    batches, rank = _shared_batches(tokenizer, (safety, utility), settings, shard)
    return {
        name: unit_statistics(
            model,
            batches[name],
            method=settings.method,
            show_progress_bar=show_progress and rank == 0,
            metadata=calibration_metadata(data, settings, model_source),
        )
        for name, data in zip(CALIBRATION_SETS, (safety, utility))
    }


def calibration_key(
    model: nn.Module,
    tokenizer: Any,
    safety: CalibrationSet,
    utility: CalibrationSet,
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    classification: Optional[Mapping[str, Any]] = None,
    model_source: Optional[Mapping[str, Any]] = None,
) -> str:
    """sha256 (hex) of everything :func:`unit_map_from_calibration` makes its map of: the model's fingerprint (shapes
    and a sample of its weights, as a map's check reads them), the tokenizer's vocabulary size and chat template,
    both sets' metadata (their data's sha256), the settings and the classification. Two calls with one key make the
    same map, so a map scored once can be reused (``ssah-peft finetune`` keeps them by this key)."""
    import hashlib
    import json
    from dataclasses import asdict

    from .._version import __version__
    from ..fingerprint import model_fingerprint

    facts = {
        "ssah_peft": __version__,
        "fingerprint": model_fingerprint(model),
        "vocabulary": len(tokenizer),
        "chat_template": settings.chat_template or getattr(tokenizer, "chat_template", None),
        "settings": asdict(settings),
        "sets": [calibration_metadata(data, settings, model_source) for data in (safety, utility)],
        "classification": dict(classification or {}),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def unit_map_from_calibration(
    model: nn.Module,
    tokenizer: Any,
    safety: CalibrationSet,
    utility: CalibrationSet,
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    classification: Optional[Mapping[str, Any]] = None,
    model_source: Optional[Mapping[str, Any]] = None,
    show_progress: bool = True,
) -> UnitMap:
    """Score ``model`` on ``safety`` and ``utility`` and classify its units: the map of the statistics of
    :func:`calibration_statistics` (the same batches, in a process group too), scored without hashing the weights
    (a map does not record that hash; only shard files are compared by it). ``classification`` holds the keyword
    arguments of :meth:`UnitMap.from_scores` (``scu``, ``ucu``, ``ru``, ``standardize``, ``ranking``,
    ``composite_fraction``), the library's defaults when not given."""
    batches, rank = _shared_batches(tokenizer, (safety, utility), settings, None)
    scores = [
        score_units(
            model,
            batches[name],
            method=settings.method,
            show_progress_bar=show_progress and rank == 0,
            metadata=calibration_metadata(data, settings, model_source),
        )
        for name, data in zip(CALIBRATION_SETS, (safety, utility))
    ]
    return UnitMap.from_scores(*scores, **dict(classification or {}))


def _shared_batches(
    tokenizer: Any, sets: Sequence[CalibrationSet], settings: CalibrationSettings, shard: Optional[tuple[int, int]]
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """The batches of this process's share of each set (by name) and its rank in the process group (0 without one).

    In a group the share is the process's; otherwise ``shard``'s, or all pairs. Every record of a share must leave
    a token to score (:class:`NoTokensToScore`)."""
    rank, world = _group_rank()
    first, step = (rank, world) if world > 1 else (shard or (0, 1))
    batches = {}
    for name, data in zip(CALIBRATION_SETS, sets):
        share = list(data.pairs[first::step])
        found = []
        if share:  # a shard left without pairs contributes nothing to the merge
            found = build_calibration_batches(
                tokenizer,
                share,
                tokens=settings.tokens,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
                chat_template=settings.chat_template,
                system_prompt=settings.system_prompt,
            )
        scored = [bool(row) for batch in found for row in batch["score_mask"].any(dim=1)]
        empty = [first + i * step + 1 for i, has_tokens in enumerate(scored) if not has_tokens]
        if empty:
            raise NoTokensToScore(data.source, empty, settings)
        batches[name] = found
    return batches, rank
