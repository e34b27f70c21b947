"""The unit map file: one safetensors file per map, and the checks that make a loaded file safe to use.

A map is written as int8 type codes and float32 scores per layer and block kind (tensors
``types|safety|utility.<layer>.<kind>``), with JSON fields in the header (``format``, ``format_version``,
``unit_types``, ``fingerprint``, ``settings``, ``calibration``, ``composite_fraction``, ``metadata``). The same map
always gives the same bytes, and a save replaces the file atomically (:mod:`ssah_peft._files`).

Reading checks the file against its own header before anything uses it: a map's indices select the weights that
training protects or changes, so a truncated, hand-edited or foreign file must fail here, naming the file and the
problem, rather than select wrong units later. Separate from :mod:`.classification` because this is the format's
contract, read by the command line as well (:data:`FILE_FORMAT` recognises our own files).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from .._files import (
    canonical_json,
    check_format,
    header_json,
    layer_tensor_names,
    layer_tensor_problems,
    read_safetensors,
    safetensors_bytes,
    write_atomic,
)
from .._version import __version__
from ..units import BLOCK_KINDS
from .codes import UNIT_TYPES

if TYPE_CHECKING:
    from .classification import UnitMap

FILE_FORMAT = "ssah_peft.UnitMap"
FILE_FORMAT_VERSION = "1"

_TENSOR_DTYPES = {"types": torch.int8, "safety": torch.float32, "utility": torch.float32}


def write_unit_map(unit_map: UnitMap, path: Union[str, Path]) -> None:
    """Write ``unit_map`` to ``path`` (module docstring); behind :meth:`UnitMap.save`."""
    groups = {"types": unit_map.types, "safety": unit_map.safety_scores, "utility": unit_map.utility_scores}
    tensors = {
        f"{group}.{layer}.{kind}": per_block[kind][layer].contiguous()
        for layer in range(unit_map.num_layers)
        for kind in unit_map.kinds
        for group, per_block in groups.items()
    }
    metadata = {
        "format": FILE_FORMAT,
        "format_version": FILE_FORMAT_VERSION,
        "ssah_peft_version": __version__,
        "unit_types": canonical_json(UNIT_TYPES),
        "fingerprint": canonical_json(unit_map.fingerprint),
        "settings": canonical_json(unit_map.settings),
        "calibration": canonical_json(unit_map.calibration),
        "composite_fraction": canonical_json(unit_map.composite_fraction),
        "metadata": canonical_json(unit_map.metadata),
    }
    write_atomic(path, safetensors_bytes(tensors, metadata))


def read_unit_map(path: Union[str, Path]) -> dict[str, Any]:
    """The fields of the :class:`UnitMap` saved at ``path``, checked (module docstring); behind :meth:`UnitMap.load`.

    ``ValueError`` names the file and the first problem (``FileNotFoundError`` for a missing file).
    """
    with read_safetensors(path, "a unit map file") as f:
        header = f.metadata() or {}
        check_format(path, header, name=FILE_FORMAT, version=FILE_FORMAT_VERSION, what="unit map")
        fields = _read_metadata_fields(path, header)
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    per_block = _check_tensors(path, tensors, fields["fingerprint"])  # block kinds in BLOCK_KINDS order
    return {
        "types": per_block["types"],
        "safety_scores": per_block["safety"],
        "utility_scores": per_block["utility"],
        **{name: fields[name] for name in ("fingerprint", "settings", "calibration", "composite_fraction", "metadata")},
    }


def _read_metadata_fields(path: Union[str, Path], header: Mapping[str, str]) -> dict[str, Any]:
    """The JSON fields of a map file's header, parsed and checked (the first problem is raised, naming the file)."""
    fields: dict[str, Any] = {}
    for name in ("unit_types", "fingerprint", "settings", "calibration", "composite_fraction", "metadata"):
        if name not in header:
            if name == "metadata":  # optional: maps written before it existed
                fields[name] = {}
                continue
            raise ValueError(f"{path}: metadata field {name!r} is missing")
        fields[name] = header_json(path, header, name)
    if not isinstance(fields["unit_types"], list) or tuple(fields["unit_types"]) != UNIT_TYPES:
        raise ValueError(f"{path} codes unit types as {header['unit_types']}, expected {list(UNIT_TYPES)}")
    for name in ("fingerprint", "settings", "calibration", "metadata"):
        if not isinstance(fields[name], dict):
            raise ValueError(f"{path}: metadata field {name!r} must be a JSON object, got {header[name]!r}")
    _check_fingerprint_fields(path, fields["fingerprint"])
    settings = fields["settings"]
    if settings.get("ranking") not in ("global", "per_layer"):
        raise ValueError(
            f"{path}: metadata field 'settings': ranking must be 'global' or 'per_layer', "
            f"got {settings.get('ranking')!r}"
        )
    if not isinstance(settings.get("standardize"), bool):
        raise ValueError(f"{path}: metadata field 'settings': standardize must be true or false")
    for name in ("scu", "ucu", "ru"):
        if not _is_fraction(settings.get(name)):
            raise ValueError(
                f"{path}: metadata field 'settings': {name} must be a number in [0, 1], got {settings.get(name)!r}"
            )
    if not _is_fraction(fields["composite_fraction"]):
        raise ValueError(
            f"{path}: metadata field 'composite_fraction' must be a number in [0, 1], "
            f"got {header['composite_fraction']}"
        )
    return fields


def _check_fingerprint_fields(path: Union[str, Path], fingerprint: dict[str, Any]) -> None:
    num_layers, widths = fingerprint.get("num_layers"), fingerprint.get("widths")
    if not (_is_int(num_layers) and num_layers > 0 and isinstance(widths, dict) and widths):
        raise ValueError(
            f"{path}: metadata field 'fingerprint' must hold num_layers (a positive integer) and widths (units per "
            f"layer of each block kind), got {fingerprint!r}"
        )
    unknown = [kind for kind in widths if kind not in BLOCK_KINDS]
    if unknown:
        raise ValueError(f"{path}: the fingerprint names the block kind {unknown[0]!r}; expected one of {BLOCK_KINDS}")
    for kind, per_layer in sorted(widths.items(), key=lambda item: BLOCK_KINDS.index(item[0])):
        if not isinstance(per_layer, list) or not all(_is_int(w) and w > 0 for w in per_layer):
            raise ValueError(
                f"{path}: the fingerprint's widths of {kind!r} must be positive integers, got {per_layer!r}"
            )
        if len(per_layer) != num_layers:
            raise ValueError(
                f"{path}: the fingerprint's widths of {kind!r} list {len(per_layer)} layers, but num_layers is "
                f"{num_layers}"
            )


def _check_tensors(
    path: Union[str, Path], tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any]
) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
    """The tensors of a map file by group and kind, after checking them against the fingerprint."""
    num_layers, widths = fingerprint["num_layers"], fingerprint["widths"]
    kinds = sorted(widths, key=BLOCK_KINDS.index)
    groups = list(_TENSOR_DTYPES)
    missing, unexpected = layer_tensor_problems(tensors, groups, num_layers, kinds)
    if missing:
        raise ValueError(
            f"{path} is not a complete unit map: tensor(s) {missing} missing (the map's fingerprint describes "
            f"{num_layers} layers of {', '.join(kinds)})"
        )
    if unexpected:
        raise ValueError(
            f"{path} holds unexpected tensor(s) {unexpected} (a unit map holds exactly "
            f"types/safety/utility.<layer>.<kind> for the {num_layers} layers and the blocks {', '.join(kinds)} of "
            "its fingerprint)"
        )
    for key in layer_tensor_names(groups, num_layers, kinds):  # as many as the file holds (checked above)
        group, layer, kind = key.split(".")
        tensor, width = tensors[key], widths[kind][int(layer)]
        if tensor.dtype != _TENSOR_DTYPES[group]:
            raise ValueError(
                f"{path}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected "
                f"{str(_TENSOR_DTYPES[group]).removeprefix('torch.')}"
            )
        if tensor.dim() != 1:
            raise ValueError(f"{path}: tensor {key} has shape {list(tensor.shape)}, expected a vector")
        if tensor.numel() != width:
            raise ValueError(
                f"{path}: tensor {key} has {tensor.numel()} entries, but the map's fingerprint gives layer {layer}'s "
                f"{kind} block {width} units"
            )
        if group == "types":
            bad = tensor[(tensor < 0) | (tensor >= len(UNIT_TYPES))]
            if bad.numel():
                raise ValueError(
                    f"{path}: tensor {key} holds type codes {sorted(set(bad.tolist()))[:10]} outside "
                    f"0..{len(UNIT_TYPES) - 1} (UNIT_TYPES {UNIT_TYPES})"
                )
        else:
            non_finite = int((~torch.isfinite(tensor)).sum())
            if non_finite:
                raise ValueError(f"{path}: tensor {key} holds {non_finite} non-finite score(s) (NaN/inf)")
    return {
        group: {kind: tuple(tensors[f"{group}.{layer}.{kind}"] for layer in range(num_layers)) for kind in kinds}
        for group in _TENSOR_DTYPES
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
