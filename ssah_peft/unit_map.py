"""`UnitMap`: every unit of a model classified as safety-critical, utility-critical, composite or redundant.

Li & Kim (arXiv 2410.10862, Sec. 4) classify units from a safety score I_S and a utility score I_U
(:func:`ssah_peft.score_units` on safety and on utility calibration data):

1. **RU** (redundant): the units with the smallest I_S + I_U;
2. among the rest, the two extremes of the difference D = I_S − I_U:
   **SCU** (safety-critical) = the largest D (far more important for safety than for utility),
   **UCU** (utility-critical) = the smallest, most negative D;
3. **CU** (composite): all other units.

Sign convention: D = I_S − I_U, positive when a unit matters more for safety. Group sizes are fractions of ALL
units of the ranking scope; the defaults are the paper's Llama-2-7B-Chat figures (SCU 1.3%, UCU 13.3%, RU 14.8%).

A map feeds :class:`ssah_peft.SSAHConfig` directly (``units=unit_map``): select mode trains the RU (the
paper's "redundant budget"), protect mode freezes the SCU plus, optionally, the most safety-leaning CU
(:attr:`UnitMap.composite_fraction`; the paper's "SCU + top 6% CU").
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from ._files import canonical_json, read_safetensors, safetensors_bytes, write_atomic
from .scoring import UnitScores, model_fingerprint
from .units import BLOCK_KINDS, ArchitectureSpec

UnitType = Literal["SCU", "UCU", "CU", "RU"]
#: The unit types; a type's position is its int8 code in saved maps.
UNIT_TYPES: tuple[str, ...] = ("CU", "SCU", "UCU", "RU")
UNIT_TYPE_NAMES = {"SCU": "safety-critical", "UCU": "utility-critical", "CU": "composite", "RU": "redundant"}
Ranking = Literal["global", "per_layer"]
UnitsDict = dict[str, dict[str, list[int]]]
PerBlock = dict[str, tuple[torch.Tensor, ...]]

FILE_FORMAT = "ssah_peft.UnitMap"
FILE_FORMAT_VERSION = "1"

_CU, _SCU, _UCU, _RU = (UNIT_TYPES.index(t) for t in ("CU", "SCU", "UCU", "RU"))
_REPORT_ORDER: tuple[str, ...] = ("SCU", "UCU", "CU", "RU")


@dataclass(eq=False)
class UnitMap:
    """Unit types of one model, with the scores they came from.

    Build one with :meth:`from_scores`, or :meth:`load` a saved one. Tensors are indexed
    ``types[kind][layer][unit]`` (int8 codes into :data:`UNIT_TYPES`) and ``safety_scores[kind][layer][unit]``
    (float32; the scores are rounded to float32 before ranking, so a saved and reloaded map ranks identically).
    """

    types: PerBlock
    safety_scores: PerBlock
    utility_scores: PerBlock
    fingerprint: dict[str, Any]
    """The model the indices refer to (:func:`ssah_peft.scoring.model_fingerprint`)."""
    settings: dict[str, Any]
    """How the units were classified: proportions, standardisation, ranking scope."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """Scorer and data of each score: ``{"safety": {...}, "utility": {...}}``."""
    composite_fraction: float = 0.0
    """Fraction of all units, taken from the most safety-leaning CU, that protect mode freezes besides the SCU."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-serialisable notes kept with the map, e.g. the group sizes chosen by a degradation scan
    (:func:`ssah_peft.analysis.degradation_scan` writes ``metadata["scan"]``)."""

    # ------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_scores(
        cls,
        safety: UnitScores,
        utility: UnitScores,
        *,
        scu: float = 0.013,
        ucu: float = 0.133,
        ru: float = 0.148,
        standardize: bool = False,
        ranking: Ranking = "global",
        composite_fraction: float = 0.0,
    ) -> UnitMap:
        """Classify units from safety scores I_S and utility scores I_U (module docstring).

        Args:
            safety: scores on safety data (I_S).
            utility: scores on utility data (I_U), same model and method.
            scu, ucu, ru: sizes of the groups as fractions of all units of the ranking scope (rounded to the
                nearest count).
            standardize: z-score I_S and I_U separately within each layer and block kind before ranking (as
                FLAP does), so layers with larger activations do not dominate a global ranking.
            ranking: ``"global"`` ranks all units of the model together; ``"per_layer"`` ranks each layer's
                block separately, giving every block the same proportions.
            composite_fraction: initial value of :attr:`composite_fraction`.
        """
        if safety.fingerprint != utility.fingerprint:
            raise ValueError(
                "Safety and utility scores come from different models: "
                f"{_describe(safety.fingerprint)} vs {_describe(utility.fingerprint)}"
            )
        if safety.method != utility.method:
            raise ValueError(
                f"Safety scores use method {safety.method!r} and utility scores {utility.method!r}; "
                "their difference is only meaningful on one scale"
            )
        for which, scores in (("safety", safety), ("utility", utility)):  # a saved map must load again
            for kind, per_layer in scores.scores.items():
                for layer, values in enumerate(per_layer):
                    if not torch.isfinite(values.detach().float()).all():
                        raise ValueError(
                            f"The {which} scores of layer {layer}'s {kind} block hold NaN/inf (as float32); unit "
                            "types need finite scores"
                        )
        for name, value in (("scu", scu), ("ucu", ucu), ("ru", ru)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
        if scu + ucu + ru > 1.0:
            raise ValueError(f"scu + ucu + ru = {scu + ucu + ru} exceeds all units")
        if ranking not in ("global", "per_layer"):
            raise ValueError(f"ranking must be 'global' or 'per_layer', got {ranking!r}")
        if not 0.0 <= composite_fraction <= 1.0:
            raise ValueError(f"composite_fraction must be in [0, 1], got {composite_fraction}")
        unit_map = cls(
            types={},
            safety_scores=_as_float32(safety.scores),
            utility_scores=_as_float32(utility.scores),
            fingerprint=dict(safety.fingerprint),
            settings={"scu": scu, "ucu": ucu, "ru": ru, "standardize": standardize, "ranking": ranking},
            calibration={"safety": safety.calibration_info(), "utility": utility.calibration_info()},
            composite_fraction=composite_fraction,
        )
        s, u = unit_map._ranking_values()
        codes = torch.empty(s.numel(), dtype=torch.int8)
        for scope in unit_map._ranking_scopes():
            codes[scope] = _classify(s[scope], u[scope], scu, ucu, ru)
        unit_map.types = unit_map._unflatten(codes)
        return unit_map

    # ------------------------------------------------------------------------------------------------
    # Unit sets
    # ------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self.fingerprint["num_layers"])

    @property
    def kinds(self) -> tuple[str, ...]:
        return _ordered_kinds(self.safety_scores)

    def units_of(self, unit_type: UnitType) -> UnitsDict:
        """``{str(layer): {kind: sorted indices}}`` of the units of one type (every layer and kind listed)."""
        return self._to_units_dict(self._flat_types() == _code(unit_type))

    def top_composite(self, fraction: float) -> UnitsDict:
        """The most safety-leaning CU: the ``fraction`` of all units (per ranking scope) with the largest D.

        CU are ranked by the same D = I_S − I_U (standardised if the map is) that picked the SCU, i.e. the ranking
        continues just below the SCU. ``fraction`` counts all units, as the paper's "SCU + top 6% CU".
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        s, u = self._ranking_values()
        difference = s - u
        composite = self._flat_types() == _CU
        chosen = torch.zeros_like(composite)
        for scope in self._ranking_scopes():
            count = _count(fraction, scope.numel())
            candidates = scope[composite[scope]]
            if count > candidates.numel():
                raise ValueError(
                    f"top_composite({fraction}) needs {count} CU in a ranking scope that has {candidates.numel()}"
                )
            order = torch.sort(difference[candidates], descending=True, stable=True).indices
            chosen[candidates[order[:count]]] = True
        return self._to_units_dict(chosen)

    def config_units(self, mode: str) -> UnitsDict:
        """Units for :class:`ssah_peft.SSAHConfig`: RU to train (``"select"``), or SCU plus
        ``top_composite(composite_fraction)`` to freeze (``"protect"``)."""
        if mode == "select":
            return self.units_of("RU")
        if mode == "protect":
            protected = self.units_of("SCU")
            if self.composite_fraction > 0:
                extra = self.top_composite(self.composite_fraction)
                for layer, blocks in extra.items():
                    for kind, indices in blocks.items():
                        protected[layer][kind] = sorted(protected[layer][kind] + indices)
            return protected
        raise ValueError(f"mode must be 'select' or 'protect', got {mode!r}")

    def counts(self) -> dict[tuple[int, str], dict[str, int]]:
        """Number of units of each type per ``(layer, kind)``."""
        return {
            (layer, kind): {t: int((self.types[kind][layer] == _code(t)).sum()) for t in UNIT_TYPES}
            for layer, kind in self._blocks()
        }

    # ------------------------------------------------------------------------------------------------
    # Model checks and comparisons
    # ------------------------------------------------------------------------------------------------

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` has the layer count and block widths this map was made for."""
        check_model_fingerprint(self.fingerprint, model)

    def overlap(self, other: UnitMap) -> dict[str, float]:
        """Intersection over union of each type's unit set in two maps of the same model.

        Measures the stability of the classification across calibration sets, seeds or scorers. Two empty sets
        count as identical (1.0).
        """
        self._check_comparable(other)
        mine, theirs = self._flat_types(), other._flat_types()
        result = {}
        for unit_type in UNIT_TYPES:
            a, b = mine == _code(unit_type), theirs == _code(unit_type)
            union = int((a | b).sum())
            result[unit_type] = int((a & b).sum()) / union if union else 1.0
        return result

    def migration(self, after: UnitMap) -> Migration:
        """How units change type from this map (e.g. before fine-tuning) to ``after`` (the paper's Sec. 5.3)."""
        self._check_comparable(after)
        pairs = self._flat_types().long() * len(UNIT_TYPES) + after._flat_types().long()
        counts = torch.bincount(pairs, minlength=len(UNIT_TYPES) ** 2).reshape(len(UNIT_TYPES), len(UNIT_TYPES))
        return Migration(counts)

    # ------------------------------------------------------------------------------------------------
    # Reports
    # ------------------------------------------------------------------------------------------------

    def summary(self) -> str:
        """A text table of the number of units of each type per layer and block kind, with totals."""
        counts = self.counts()
        columns = [(kind, t) for kind in self.kinds for t in _REPORT_ORDER]
        header = ["layer", *(f"{kind}:{t}" for kind, t in columns)]
        rows = [[str(layer), *(str(counts[layer, kind][t]) for kind, t in columns)] for layer in range(self.num_layers)]
        rows.append(
            ["total", *(str(sum(counts[layer, kind][t] for layer in range(self.num_layers))) for kind, t in columns)]
        )
        totals = {t: sum(c[t] for c in counts.values()) for t in _REPORT_ORDER}
        num_units = sum(totals.values())
        overall = ", ".join(f"{t} {totals[t]} ({100 * totals[t] / num_units:.1f}%)" for t in _REPORT_ORDER)
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return "\n".join(
            [
                f"Unit map of a {self.fingerprint.get('model_type')} model ({settings})",
                _text_table(header, rows),
                f"all {num_units} units: {overall}",
            ]
        )

    def plot(self, path: Union[str, Path]) -> Path:
        """Write a PNG with, per block kind, the share of each unit type in every layer (stacked bars)."""
        from matplotlib.figure import Figure

        colors = {"SCU": "#d62728", "UCU": "#1f77b4", "CU": "#bbbbbb", "RU": "#2ca02c"}
        counts = self.counts()
        figure = Figure(figsize=(max(6.0, 0.35 * self.num_layers + 2), 3.2 * len(self.kinds)), layout="constrained")
        axes = figure.subplots(len(self.kinds), 1, squeeze=False)[:, 0]
        layers = list(range(self.num_layers))
        for ax, kind in zip(axes, self.kinds):
            bottom = [0.0] * self.num_layers
            for unit_type in ("SCU", "UCU", "RU", "CU"):
                shares = [100 * counts[layer, kind][unit_type] / self.types[kind][layer].numel() for layer in layers]
                ax.bar(layers, shares, bottom=bottom, color=colors[unit_type], label=unit_type)
                bottom = [b + s for b, s in zip(bottom, shares)]
            ax.set_title(f"{kind} units")
            ax.set_xlabel("layer")
            ax.set_ylabel("% of units")
            ax.set_ylim(0, 100)
        axes[0].legend(loc="upper right", ncols=4, fontsize="small")
        path = Path(path)
        figure.savefig(path, format="png", dpi=120)
        return path

    # ------------------------------------------------------------------------------------------------
    # File
    # ------------------------------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> None:
        """Write one safetensors file: int8 types and float32 scores per layer/kind, JSON metadata in the header.

        The same map always gives the same bytes, and the file is replaced atomically: a reader, or a save that is
        killed, never leaves half a map (see :mod:`ssah_peft._files`).
        """
        from . import __version__

        tensors = {}
        for layer, kind in self._blocks():
            tensors[f"types.{layer}.{kind}"] = self.types[kind][layer].contiguous()
            tensors[f"safety.{layer}.{kind}"] = self.safety_scores[kind][layer].contiguous()
            tensors[f"utility.{layer}.{kind}"] = self.utility_scores[kind][layer].contiguous()
        metadata = {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION,
            "ssah_peft_version": __version__,
            "unit_types": canonical_json(UNIT_TYPES),
            "fingerprint": canonical_json(self.fingerprint),
            "settings": canonical_json(self.settings),
            "calibration": canonical_json(self.calibration),
            "composite_fraction": canonical_json(self.composite_fraction),
            "metadata": canonical_json(self.metadata),
        }
        write_atomic(path, safetensors_bytes(tensors, metadata))

    @classmethod
    def load(cls, path: Union[str, Path]) -> UnitMap:
        """Read a map written by :meth:`save`.

        The file is checked against its own metadata: every tensor the fingerprint's layers and blocks call for is
        there, with the fingerprint's width, the expected dtype, type codes of :data:`UNIT_TYPES` and finite scores,
        and nothing else is. ``ValueError`` names the file and the problem otherwise (``FileNotFoundError`` for a
        missing file).
        """
        with read_safetensors(path, "a unit map file") as f:
            header = f.metadata() or {}
            _check_format(path, header)
            fields = _read_metadata_fields(path, header)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        per_block = _check_tensors(path, tensors, fields["fingerprint"])  # block kinds in BLOCK_KINDS order
        return cls(
            types=per_block["types"],
            safety_scores=per_block["safety"],
            utility_scores=per_block["utility"],
            fingerprint=fields["fingerprint"],
            settings=fields["settings"],
            calibration=fields["calibration"],
            composite_fraction=fields["composite_fraction"],
            metadata=fields["metadata"],
        )

    # ------------------------------------------------------------------------------------------------
    # Internals: units are flattened layer by layer, block kinds in BLOCK_KINDS order
    # ------------------------------------------------------------------------------------------------

    def _blocks(self) -> Iterator[tuple[int, str]]:
        for layer in range(self.num_layers):
            for kind in self.kinds:
                yield layer, kind

    def _flatten(self, per_block: PerBlock) -> torch.Tensor:
        return torch.cat([per_block[kind][layer] for layer, kind in self._blocks()])

    def _unflatten(self, flat: torch.Tensor) -> PerBlock:
        result: dict[str, list[torch.Tensor]] = {}
        offset = 0
        for layer, kind in self._blocks():
            width = self.safety_scores[kind][layer].numel()
            result.setdefault(kind, []).append(flat[offset : offset + width].clone())
            offset += width
        return {kind: tuple(tensors) for kind, tensors in result.items()}

    def _flat_types(self) -> torch.Tensor:
        return self._flatten(self.types)

    def _ranking_scopes(self) -> list[torch.Tensor]:
        """Flat indices of the units ranked together: all units, or one block per scope."""
        widths = [self.safety_scores[kind][layer].numel() for layer, kind in self._blocks()]
        if self.settings["ranking"] == "global":
            return [torch.arange(sum(widths))]
        starts = torch.tensor([0, *widths]).cumsum(0).tolist()
        return [torch.arange(start, start + width) for start, width in zip(starts, widths)]

    def _ranking_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat float64 I_S and I_U, z-scored within each layer and block kind if the map is standardised."""
        values = []
        for scores in (self.safety_scores, self.utility_scores):
            blocks = [scores[kind][layer].double() for layer, kind in self._blocks()]
            if self.settings["standardize"]:
                blocks = [_zscore(block) for block in blocks]
            values.append(torch.cat(blocks))
        return values[0], values[1]

    def _to_units_dict(self, flat_mask: torch.Tensor) -> UnitsDict:
        per_block = self._unflatten(flat_mask)
        return {
            str(layer): {kind: torch.nonzero(per_block[kind][layer]).flatten().tolist() for kind in self.kinds}
            for layer in range(self.num_layers)
        }

    def _check_comparable(self, other: UnitMap) -> None:
        if other.fingerprint != self.fingerprint:
            raise ValueError(
                f"Unit maps of different models cannot be compared: {_describe(self.fingerprint)} vs "
                f"{_describe(other.fingerprint)}"
            )


@dataclass(frozen=True, eq=False)
class Migration:
    """Counts of units moving from type ``UNIT_TYPES[i]`` (before) to ``UNIT_TYPES[j]`` (after): ``counts[i, j]``."""

    counts: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def percent(self) -> torch.Tensor:
        """``counts`` as percentages of all units."""
        return 100.0 * self.counts.double() / self.total

    def moved(self, before: UnitType, after: UnitType) -> int:
        return int(self.counts[_code(before), _code(after)])

    def table(self) -> str:
        """Text matrix, rows = type before, columns = type after, cells = count (% of all units)."""
        percent = self.percent
        rows = [
            [a, *(f"{self.moved(a, b)} ({percent[_code(a), _code(b)]:.2f}%)" for b in _REPORT_ORDER)]
            for a in _REPORT_ORDER
        ]
        return _text_table(["before \\ after", *_REPORT_ORDER], rows)


def _classify(s: torch.Tensor, u: torch.Tensor, scu: float, ucu: float, ru: float) -> torch.Tensor:
    """Type codes of one ranking scope (module docstring); ties break towards the lower flat index."""
    n = s.numel()
    codes = torch.full((n,), _CU, dtype=torch.int8)
    num_ru, num_scu, num_ucu = _count(ru, n), _count(scu, n), _count(ucu, n)
    if num_ru + num_scu + num_ucu > n:
        raise ValueError(f"{num_ru} RU + {num_scu} SCU + {num_ucu} UCU exceed the {n} units of a ranking scope")
    redundant = torch.sort(s + u, stable=True).indices[:num_ru]
    codes[redundant] = _RU
    rest = torch.nonzero(codes == _CU).flatten()
    by_difference = rest[torch.sort((s - u)[rest], descending=True, stable=True).indices]
    codes[by_difference[:num_scu]] = _SCU
    codes[by_difference[by_difference.numel() - num_ucu :]] = _UCU
    return codes


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


def _count(fraction: float, n: int) -> int:
    return math.floor(fraction * n + 0.5)


def _code(unit_type: str) -> int:
    if unit_type not in UNIT_TYPES:
        raise ValueError(f"Unknown unit type {unit_type!r}; expected one of {UNIT_TYPES}")
    return UNIT_TYPES.index(unit_type)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std(correction=0)
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def _as_float32(scores: Mapping[str, tuple[torch.Tensor, ...]]) -> PerBlock:
    return {kind: tuple(t.detach().cpu().float() for t in scores[kind]) for kind in _ordered_kinds(scores)}


def _ordered_kinds(per_block: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(k for k in BLOCK_KINDS if k in per_block)


def check_model_fingerprint(
    fingerprint: Mapping[str, Any], model: nn.Module, architecture: Optional[ArchitectureSpec] = None
) -> None:
    """Raise ``ValueError`` unless ``model`` is the model a unit map with ``fingerprint`` was computed for.

    The check behind :meth:`UnitMap.check_model`, also run by the SSAH tuner when a config built from a map
    (:attr:`ssah_peft.SSAHConfig.unit_map_fingerprint`) meets a model. ``architecture``: where the units are, when
    not the table's entry for the model type.
    """
    found = model_fingerprint(model, architecture)
    if found != dict(fingerprint):
        raise ValueError(
            f"This unit map was computed for a model with {_describe(fingerprint)}, but the model has "
            f"{_describe(found)}; its unit indices would point at the wrong units. Score this model instead "
            "(`ssah-peft score`, or ssah_peft.score_units and UnitMap.from_scores) and use that map."
        )


def _check_format(path: Union[str, Path], header: Mapping[str, str]) -> None:
    if header.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not an ssah-peft unit map (format: {header.get('format')!r})")
    if header.get("format_version") != FILE_FORMAT_VERSION:
        raise ValueError(
            f"{path} has unit map format version {header.get('format_version')!r}; this ssah-peft reads "
            f"version {FILE_FORMAT_VERSION}"
        )


def _read_metadata_fields(path: Union[str, Path], header: Mapping[str, str]) -> dict[str, Any]:
    """The JSON fields of a map file's header, parsed and checked (the first problem is raised, naming the file)."""
    fields: dict[str, Any] = {}
    for name in ("unit_types", "fingerprint", "settings", "calibration", "composite_fraction", "metadata"):
        if name not in header:
            if name == "metadata":  # optional: maps written before it existed
                fields[name] = {}
                continue
            raise ValueError(f"{path}: metadata field {name!r} is missing")
        try:
            fields[name] = json.loads(header[name])
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: metadata field {name!r} is not valid JSON ({error})") from None
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


_TENSOR_DTYPES = {"types": torch.int8, "safety": torch.float32, "utility": torch.float32}


def _check_tensors(
    path: Union[str, Path], tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any]
) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
    """The tensors of a map file by group and kind, after checking them against the fingerprint."""
    num_layers, widths = fingerprint["num_layers"], fingerprint["widths"]
    kinds = sorted(widths, key=BLOCK_KINDS.index)
    expected = [f"{group}.{layer}.{kind}" for layer in range(num_layers) for kind in kinds for group in _TENSOR_DTYPES]
    missing = [key for key in expected if key not in tensors]
    if missing:
        listed = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        raise ValueError(
            f"{path} is not a complete unit map: tensor(s) {listed} missing (the map's fingerprint describes "
            f"{num_layers} layers of {', '.join(kinds)})"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        listed = ", ".join(unexpected[:12]) + (f" and {len(unexpected) - 12} more" if len(unexpected) > 12 else "")
        raise ValueError(
            f"{path} holds unexpected tensor(s) {listed} (a unit map holds exactly types/safety/utility.<layer>.<kind> "
            f"for the {num_layers} layers and the blocks {', '.join(kinds)} of its fingerprint)"
        )
    for key in expected:
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


def _describe(fingerprint: Mapping[str, Any]) -> str:
    return (
        f"model_type={fingerprint.get('model_type')!r}, {fingerprint.get('num_layers')} layers, hidden sizes "
        f"{fingerprint.get('hidden_sizes')}, block widths {fingerprint.get('widths')}"
    )
