"""Partial score files: the statistics of shards scored by independent jobs, saved and merged exactly.

Scoring a large calibration set is split across jobs that never talk to each other (separate machines, separate
times). Each job saves its :class:`UnitStatistics` with :func:`save_partial_scores`; :func:`merge_partial_scores`
reads the files of all shards, refuses any set that is incomplete or comes from another model, method or data,
and merges them into the scores of one pass over everything. The file is safetensors: one float64 tensor per
block and statistic, the rest (format, rank, fingerprint, metadata, weights hash) in its JSON header.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .._files import (
    canonical_json,
    check_format,
    header_json,
    layer_tensor_problems,
    read_safetensors,
    safetensors_bytes,
    write_atomic,
)
from .._version import __version__
from ..fingerprint import shape_fingerprint
from .accumulators import merged_accumulator
from .results import UnitScores, UnitStatistics, group_by_block
from .scorer import SCORING_METHODS

PARTIAL_FILE_FORMAT = "ssah_peft.PartialScores"
PARTIAL_FILE_FORMAT_VERSION = "2"  # 2: the weights' sha256 is recorded per set


def save_partial_scores(
    path: Union[str, Path], statistics: Mapping[str, UnitStatistics], *, rank: int, world_size: int
) -> None:
    """Write the statistics of shard ``rank`` of ``world_size`` to one safetensors file.

    Args:
        path: the file to write.
        statistics: the shard's :func:`unit_statistics` per calibration set, e.g. ``{"safety": ..., "utility":
            ...}``; every shard's file must hold the same sets.
        rank, world_size: which shard this is, so that :func:`merge_partial_scores` can tell a missing or
            repeated shard from a complete set.

    The same statistics always give the same bytes, and the file is replaced atomically (a killed save leaves
    the previous file; see :mod:`ssah_peft._files`).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank {rank} of world size {world_size}")
    tensors = {}
    for name, part in statistics.items():
        if not name or "." in name:
            raise ValueError(f"calibration set names must be non-empty and without '.', got {name!r}")
        for group, per_block in (("state", part.states), ("weight", part.weight_statistics)):
            for kind, layers in per_block.items():
                for layer, tensor in enumerate(layers):
                    tensors[f"{name}.{group}.{layer}.{kind}"] = tensor.contiguous()
    metadata = {
        "format": PARTIAL_FILE_FORMAT,
        "format_version": PARTIAL_FILE_FORMAT_VERSION,
        "ssah_peft_version": __version__,
        "rank": str(rank),
        "world_size": str(world_size),
        "sets": canonical_json({name: _description(part) for name, part in statistics.items()}),
    }
    write_atomic(path, safetensors_bytes(tensors, metadata))


def merge_partial_scores(paths: Sequence[Union[str, Path]]) -> dict[str, UnitScores]:
    """The scores of one pass over all shards, from the files :func:`save_partial_scores` wrote for them.

    The shards' statistics are merged exactly in rank order, so the scores equal those of a single run over all
    the calibration data (to float64 rounding).

    Returns:
        :class:`UnitScores` per calibration set.

    Raises:
        ValueError: no files; a file that is not a partial score file; files from different world sizes; a rank
            missing or given twice; files that disagree on their calibration sets, or within a set on the
            method, the model (fingerprint or weights: :attr:`UnitStatistics.weights_sha256`), the calibration data
            (``metadata["data_sha256"]``) or the rest of the metadata describing the data and settings.
    """
    if not paths:
        raise ValueError("No partial score files were given")
    parts = sorted((_load_partial(path) for path in paths), key=lambda part: part[1])
    world_sizes = {world_size for _, _, world_size, _ in parts}
    if len(world_sizes) > 1:
        found = ", ".join(f"{path}: rank {rank} of {world_size}" for path, rank, world_size, _ in parts)
        raise ValueError(f"The partial score files come from different world sizes: {found}")
    world_size = world_sizes.pop()
    for (first, rank, _, _), (second, next_rank, _, _) in zip(parts, parts[1:]):
        if rank == next_rank:
            raise ValueError(f"Rank {rank} of {world_size} is given twice: {first} and {second}")
    given = {rank for _, rank, _, _ in parts}  # distinct, each in 0..world_size-1
    if len(given) < world_size:  # listed without enumerating a world size a damaged header may claim
        missing = list(itertools.islice((rank for rank in range(world_size) if rank not in given), 12))
        more = f" and {world_size - len(given) - len(missing)} more" if world_size - len(given) > len(missing) else ""
        raise ValueError(
            f"Rank(s) {missing}{more} of {world_size} are missing; the scores need every shard (given: "
            + ", ".join(f"{path}: rank {rank}" for path, rank, _, _ in parts)
            + ")"
        )
    reference_path, _, _, reference = parts[0]
    for path, _, _, sets in parts[1:]:
        if sets.keys() != reference.keys():
            raise ValueError(
                f"{reference_path} holds the calibration sets {sorted(reference)} but {path} holds {sorted(sets)}"
            )
        for name, part in sets.items():
            _check_same_pass(name, (reference_path, reference[name]), (path, part))
    merged = {}
    for name, first in reference.items():
        shards = [sets[name] for _, _, _, sets in parts]
        states = {
            kind: tuple(
                merged_accumulator(first.method, per_rank).state()
                for per_rank in zip(*(s.states[kind] for s in shards))
            )
            for kind in first.states
        }
        merged[name] = replace(first, states=states).finalize()
    return merged


def _load_partial(path: Union[str, Path]) -> tuple[str, int, int, dict[str, UnitStatistics]]:
    """``(path, rank, world size, statistics per calibration set)`` of a file :func:`save_partial_scores` wrote.

    The header is checked against the tensors before anything is built from it, and each set's tensors against
    its fingerprint: every layer and block present once, of the length its width and method give, finite. A file
    that fails names the file and the tensor: merged, a missing layer or unit would shift every later one.
    """
    with read_safetensors(path, "a partial score file") as f:
        header = f.metadata() or {}
        check_format(
            path,
            header,
            name=PARTIAL_FILE_FORMAT,
            version=PARTIAL_FILE_FORMAT_VERSION,
            what="partial score file",
            advice=" (score the shard again with this version)",
        )
        try:
            sets = header_json(path, header, "sets")
            rank, world_size = int(header["rank"]), int(header["world_size"])
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: the header of this partial score file is damaged ({_reason(error)})") from None
        if not 0 <= rank < world_size:
            raise ValueError(
                f"{path}: the header of this partial score file is damaged (rank {rank} is not in 0..world_size-1, "
                f"world_size {world_size})"
            )
        if not isinstance(sets, dict) or not all(isinstance(d, dict) for d in sets.values()):
            raise ValueError(f"{path}: the header of this partial score file is damaged ('sets' is not an object)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    statistics = {name: _set_statistics(path, name, description, tensors) for name, description in sets.items()}
    foreign = sorted(key for key in tensors if key.split(".")[0] not in sets)
    if foreign:
        raise ValueError(
            f"{path} holds the unexpected tensor(s) {', '.join(foreign[:12])} (expected "
            f"<set>.state|weight.<layer>.<kind> for its calibration sets {sorted(sets)})"
        )
    return str(path), rank, world_size, statistics


def _set_statistics(
    path: Union[str, Path], name: str, description: dict[str, Any], tensors: Mapping[str, torch.Tensor]
) -> UnitStatistics:
    """The statistics of calibration set ``name`` of a partial score file, from its header entry and its tensors
    (``<name>.state|weight.<layer>.<kind>``), checked against each other."""
    method, fingerprint = description.get("method"), description.get("fingerprint")
    widths = fingerprint.get("widths") if isinstance(fingerprint, dict) else None
    num_layers = fingerprint.get("num_layers") if isinstance(fingerprint, dict) else None
    if (
        method not in SCORING_METHODS
        or not (isinstance(num_layers, int) and num_layers > 0 and isinstance(widths, dict) and widths)
        or not all(
            isinstance(w, list) and len(w) == num_layers and all(isinstance(n, int) and n > 0 for n in w)
            for w in widths.values()
        )
    ):
        raise ValueError(
            f"{path}: the header of this partial score file is damaged (set {name!r}: method {method!r}, fingerprint "
            "without num_layers and widths of every layer)"
        )
    groups = ["state"] if method == "snip" else ["state", "weight"]  # snip's sums hold the weights
    own = {key: tensor for key, tensor in tensors.items() if key.split(".")[0] == name}
    missing, unexpected = layer_tensor_problems(own, [f"{name}.{group}" for group in groups], num_layers, list(widths))
    described = f"set {name!r} of {method} statistics, {num_layers} layers of {', '.join(widths)}"
    if missing:
        raise ValueError(
            f"{path} is not a complete partial score file: tensor(s) {missing} missing ({described}); score this "
            "shard again"
        )
    if unexpected:
        raise ValueError(
            f"{path} holds unexpected tensor(s) {unexpected} (expected {name}.{'|'.join(groups)}.<layer>.<kind> for "
            f"the {described})"
        )
    entries: dict[str, list[tuple[str, int, torch.Tensor]]] = {group: [] for group in groups}
    for key, tensor in own.items():
        _, group, layer, kind = key.split(".")
        width = widths[kind][int(layer)]
        length = width if group == "weight" else _state_length(method, width)
        if tensor.dtype != torch.float64 or list(tensor.shape) != [length]:
            raise ValueError(
                f"{path}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')} of shape {list(tensor.shape)}, "
                f"expected float64 of shape [{length}] (layer {layer}'s {kind} block has {width} units); the file "
                "is damaged: score this shard again"
            )
        non_finite = int((~torch.isfinite(tensor)).sum())
        if non_finite:
            raise ValueError(
                f"{path}: tensor {key} holds {non_finite} non-finite value(s) (NaN/inf); the file is damaged: score "
                "this shard again"
            )
        entries[group].append((kind, int(layer), tensor))
    try:
        return UnitStatistics(
            method=method,
            states=group_by_block(entries["state"]),
            weight_statistics=group_by_block(entries.get("weight", [])),
            fingerprint=fingerprint,
            metadata=description["metadata"],
            weights_sha256=description.get("weights_sha256"),
        )
    except KeyError as error:
        raise ValueError(f"{path}: the header of this partial score file is damaged ({_reason(error)})") from None


def _state_length(method: str, width: int) -> int:
    """Length of a block's state vector (:mod:`.accumulators`): two counts, then per unit its saliency sum (snip)
    or its mean and M2 (variance, wanda)."""
    return 2 + (width if method == "snip" else 2 * width)


def _reason(error: Exception) -> str:
    return f"no field {error}" if isinstance(error, KeyError) else str(error)


def _description(statistics: UnitStatistics) -> dict[str, Any]:
    """What a partial score file keeps of a set besides its tensors (JSON)."""
    return {
        "method": statistics.method,
        "fingerprint": statistics.fingerprint,
        "metadata": statistics.metadata,
        "weights_sha256": statistics.weights_sha256,
    }


def _check_same_pass(name: str, a: tuple[str, UnitStatistics], b: tuple[str, UnitStatistics]) -> None:
    """Shards of one calibration set must come from one model, method and data description."""
    (path_a, first), (path_b, second) = a, b
    data_a, data_b = first.metadata.get("data_sha256"), second.metadata.get("data_sha256")
    if data_a != data_b:
        raise ValueError(
            f"The calibration data of {name!r} changed between the shard jobs: {path_a} scored data with sha256 "
            f"{_short_hash(data_a)}, {path_b} data with sha256 {_short_hash(data_b)} (data: "
            f"{first.metadata.get('data')!r}, {second.metadata.get('data')!r}). Score every shard again on the same "
            "data."
        )
    for what, value_a, value_b in (
        ("methods", first.method, second.method),
        ("models (fingerprints)", shape_fingerprint(first.fingerprint), shape_fingerprint(second.fingerprint)),
        ("data or settings (metadata)", first.metadata, second.metadata),
    ):
        if value_a != value_b:
            raise ValueError(
                f"The partial scores of {name!r} come from different {what}: {path_a}: {value_a!r}, "
                f"{path_b}: {value_b!r}"
            )
    same_weights = all(
        torch.allclose(x, y, rtol=1e-9, atol=0)
        for kind, layers in first.weight_statistics.items()
        for x, y in zip(layers, second.weight_statistics[kind])
    )
    if not same_weights:
        raise ValueError(
            f"The partial scores of {name!r} come from different models: the output projection weights of "
            f"{path_a} and {path_b} differ (same architecture, other checkpoint?)"
        )
    if first.weights_sha256 != second.weights_sha256:
        raise ValueError(
            f"The partial scores of {name!r} come from different model weights: {path_a} "
            f"(sha256 {_short_hash(first.weights_sha256)}) and {path_b} (sha256 {_short_hash(second.weights_sha256)}); "
            "same architecture, another checkpoint or modified weights? Score every shard with the same model."
        )


def _short_hash(value: Optional[str]) -> str:
    return "not recorded" if value is None else f"{value[:12]}…"
