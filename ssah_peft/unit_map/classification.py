"""`UnitMap`: every unit of a model classified as safety-critical, utility-critical, composite or redundant.

Li & Kim (arXiv 2410.10862, Sec. 4) classify units from a safety score I_S and a utility score I_U
(:func:`ssah_peft.score_units` on safety and on utility calibration data):

1. **RU** (redundant): the units with the smallest I_S + I_U;
2. among the rest, the two extremes of the difference D = I_S − I_U:
   **SCU** (safety-critical) = the largest D (far more important for safety than for utility),
   **UCU** (utility-critical) = the smallest, most negative D;
3. **CU** (composite): all other units.

Sign convention: D = I_S − I_U, positive when a unit matters more for safety. Group sizes are fractions of ALL
units of the ranking scope; the defaults are the paper's Llama-2-7B-Chat figures (SCU 1.3%, UCU 13.3%, RU 14.8%;
:data:`~ssah_peft.unit_map.DEFAULT_PROPORTIONS`).

A map feeds :class:`ssah_peft.SSAHConfig` directly (``units=unit_map``): select mode trains the RU (the
paper's "redundant budget"), protect mode freezes the SCU plus, optionally, the most safety-leaning CU
(:attr:`UnitMap.composite_fraction`; the paper's "SCU + top 6% CU").

This module holds the map and its classification rules; the file format (:mod:`.file_format`), the text and figure
reports (:mod:`.report`) and the migration table (:mod:`.migration`) have modules of their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..fingerprint import (
    check_model_fingerprint,
    describe_fingerprint,
    shape_fingerprint,
    weight_sample_difference,
)
from ..scoring import UnitScores
from ..units import union_units
from .codes import (
    CU,
    DEFAULT_PROPORTIONS,
    RU,
    SCU,
    UCU,
    UNIT_TYPES,
    PerBlock,
    Ranking,
    UnitsDict,
    UnitType,
    code,
    count,
    ordered_kinds,
)
from .file_format import read_unit_map, write_unit_map
from .migration import Migration
from .report import plot_unit_types, summary_text


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
        scu: float = DEFAULT_PROPORTIONS["scu"],
        ucu: float = DEFAULT_PROPORTIONS["ucu"],
        ru: float = DEFAULT_PROPORTIONS["ru"],
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
        if shape_fingerprint(safety.fingerprint) != shape_fingerprint(utility.fingerprint):
            raise ValueError(
                "Safety and utility scores come from different models: "
                f"{describe_fingerprint(safety.fingerprint)} vs {describe_fingerprint(utility.fingerprint)}"
            )
        other_weights = weight_sample_difference(
            safety.fingerprint.get("weight_sample"), utility.fingerprint.get("weight_sample")
        )
        if other_weights is not None:
            raise ValueError(f"Safety and utility scores come from models with other weights: {other_weights}")
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
        if scu + ucu + ru > 1.0 + 1e-9:
            raise ValueError(f"scu + ucu + ru = {scu + ucu + ru} exceeds all units")
        if ranking not in ("global", "per_layer"):
            raise ValueError(f"ranking must be 'global' or 'per_layer', got {ranking!r}")
        if not 0.0 <= composite_fraction <= 1.0:
            raise ValueError(f"composite_fraction must be in [0, 1], got {composite_fraction}")
        if composite_fraction > 1.0 - (scu + ucu + ru) + 1e-9:  # the CU it takes from are what the groups leave
            raise ValueError(
                f"composite_fraction {composite_fraction} exceeds the share of composite units, 1 - (scu + ucu + ru) = "
                f"{1.0 - (scu + ucu + ru):g}; lower it or make the groups smaller"
            )
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
    def kinds(self) -> tuple[str, ...]:
        """The block kinds the map classifies, in :data:`~ssah_peft.units.BLOCK_KINDS` order."""
        return ordered_kinds(self.safety_scores)

    @property
    def num_layers(self) -> int:
        """Layers of the model the map was made for."""
        return int(self.fingerprint["num_layers"])

    def units_of(self, unit_type: UnitType) -> UnitsDict:
        """``{str(layer): {kind: sorted indices}}`` of the units of one type (every layer and kind listed)."""
        return self._to_units_dict(self._flat_types() == code(unit_type))

    def top_composite(self, fraction: float) -> UnitsDict:
        """The most safety-leaning CU: the ``fraction`` of all units (per ranking scope) with the largest D.

        CU are ranked by the same D = I_S − I_U (standardised if the map is) that picked the SCU, i.e. the ranking
        continues just below the SCU. ``fraction`` counts all units, as the paper's "SCU + top 6% CU".
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        s, u = self._ranking_values()
        difference = s - u
        composite = self._flat_types() == CU
        chosen = torch.zeros_like(composite)
        for scope in self._ranking_scopes():
            size = count(fraction, scope.numel())
            candidates = scope[composite[scope]]
            if size > candidates.numel():
                raise ValueError(
                    f"top_composite({fraction}) needs {size} CU in a ranking scope that has {candidates.numel()}"
                )
            order = torch.sort(difference[candidates], descending=True, stable=True).indices
            chosen[candidates[order[:size]]] = True
        return self._to_units_dict(chosen)

    def config_units(self, mode: str) -> UnitsDict:
        """Units for :class:`ssah_peft.SSAHConfig`: RU to train (``"select"``), or SCU plus
        ``top_composite(composite_fraction)`` to freeze (``"protect"``)."""
        if mode == "select":
            return self.units_of("RU")
        if mode == "protect":
            if self.composite_fraction > 0:
                return union_units(self.units_of("SCU"), self.top_composite(self.composite_fraction))
            return self.units_of("SCU")
        raise ValueError(f"mode must be 'select' or 'protect', got {mode!r}")

    def counts(self) -> dict[tuple[int, str], dict[str, int]]:
        """Number of units of each type per ``(layer, kind)``."""
        return {
            (layer, kind): {t: int((self.types[kind][layer] == code(t)).sum()) for t in UNIT_TYPES}
            for layer, kind in self._blocks()
        }

    # ------------------------------------------------------------------------------------------------
    # Model checks and comparisons
    # ------------------------------------------------------------------------------------------------

    def check_model(self, model: nn.Module, *, allow_other_weights: bool = False) -> None:
        """Raise ``ValueError`` unless ``model`` is the model this map was made for: its layer count and block
        widths, and (unless ``allow_other_weights``, to use a map on another checkpoint on purpose) its weights, as
        far as the map's weight sample tells (:mod:`ssah_peft.fingerprint`)."""
        check_model_fingerprint(self.fingerprint, model, allow_other_weights=allow_other_weights)

    def overlap(self, other: UnitMap) -> dict[str, float]:
        """Intersection over union of each type's unit set in two maps of the same model.

        Measures the stability of the classification across calibration sets, seeds or scorers. Two empty sets
        count as identical (1.0).
        """
        self._check_comparable(other)
        mine, theirs = self._flat_types(), other._flat_types()
        result = {}
        for unit_type in UNIT_TYPES:
            a, b = mine == code(unit_type), theirs == code(unit_type)
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
        return summary_text(self)

    def plot(self, path: Union[str, Path]) -> Path:
        """Write a PNG with, per block kind, the share of each unit type in every layer (stacked bars)."""
        return plot_unit_types(self, path)

    # ------------------------------------------------------------------------------------------------
    # File
    # ------------------------------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> None:
        """Write one safetensors file: int8 types and float32 scores per layer/kind, JSON metadata in the header.

        The same map always gives the same bytes, and the file is replaced atomically: a reader, or a save that is
        killed, never leaves half a map (see :mod:`ssah_peft._files` and :mod:`ssah_peft.unit_map.file_format`).
        """
        write_unit_map(self, path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> UnitMap:
        """Read a map written by :meth:`save`.

        The file is checked against its own metadata: every tensor the fingerprint's layers and blocks call for is
        there, with the fingerprint's width, the expected dtype, type codes of :data:`UNIT_TYPES` and finite scores,
        and nothing else is. ``ValueError`` names the file and the problem otherwise (``FileNotFoundError`` for a
        missing file).
        """
        return cls(**read_unit_map(path))

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
        return self._scopes(per_block=self.settings["ranking"] != "global")

    def _scopes(self, per_block: bool) -> list[torch.Tensor]:
        """Flat indices of all units as one scope, or of each block (layer, kind) as a scope of its own."""
        widths = [self.safety_scores[kind][layer].numel() for layer, kind in self._blocks()]
        if not per_block:
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
        """Maps of one architecture compare unit by unit, also across checkpoints (before and after fine-tuning)."""
        if shape_fingerprint(other.fingerprint) != shape_fingerprint(self.fingerprint):
            raise ValueError(
                f"Unit maps of different models cannot be compared: {describe_fingerprint(self.fingerprint)} vs "
                f"{describe_fingerprint(other.fingerprint)}"
            )


def _classify(s: torch.Tensor, u: torch.Tensor, scu: float, ucu: float, ru: float) -> torch.Tensor:
    """Type codes of one ranking scope (module docstring); ties break towards the lower flat index."""
    n = s.numel()
    codes = torch.full((n,), CU, dtype=torch.int8)
    num_ru, num_scu, num_ucu = count(ru, n), count(scu, n), count(ucu, n)
    if num_ru + num_scu + num_ucu > n:
        raise ValueError(f"{num_ru} RU + {num_scu} SCU + {num_ucu} UCU exceed the {n} units of a ranking scope")
    redundant = torch.sort(s + u, stable=True).indices[:num_ru]
    codes[redundant] = RU
    rest = torch.nonzero(codes == CU).flatten()
    by_difference = rest[torch.sort((s - u)[rest], descending=True, stable=True).indices]
    codes[by_difference[:num_scu]] = SCU
    codes[by_difference[by_difference.numel() - num_ucu :]] = UCU
    return codes


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std(correction=0)
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def _as_float32(scores: Mapping[str, tuple[torch.Tensor, ...]]) -> PerBlock:
    return {kind: tuple(t.detach().cpu().float() for t in scores[kind]) for kind in ordered_kinds(scores)}
