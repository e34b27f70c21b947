"""Choosing a budget of units: "give me this share of the units to protect, or to train", by one rule for every
scorer, and random units of exactly the counts of another choice.

Why a module of its own: a claim that the paper's scorer picks the right units (issue 17) is only as good as its
controls, and a control differs from the method in exactly one thing, which units, never how many or where. So
every choice of a budget of units is made here, for each scorer alike, from a :class:`~ssah_peft.UnitMap` (the
safety scores I_S and utility scores I_U of one scorer: ``score_units(method="variance" | "wanda" | "snip")`` on
safety and on utility data, and the types they give):

* **protect** (units to freeze), most safety-specific first:

  - ``rule="types"`` (Li & Kim, arXiv 2410.10862, Sec. 5.2: "SCU + top CU"): SCU, then CU, then the remaining
    units, each group ordered by D = I_S − I_U, largest first: the ranking that picked the SCU and that
    :meth:`~ssah_peft.UnitMap.top_composite` continues, standardised if the map is. At the budget of the SCU plus
    ``top_composite(f)`` (global allocation) it is the map's ``config_units("protect")``.
  - ``rule="difference"``: every unit by D alone, largest first, types ignored: the rival "safety attribution" of
    Wei et al. 2024 ("Assessing the Brittleness of Safety Alignment via Pruning and Low-Rank Modifications",
    ICML 2024, Sec. 2.2), who isolate safety-critical weights as the set difference of the top-q% by safety
    Wanda/SNIP score minus the top-p% by utility score. That set's size depends on q and p jointly and cannot
    be set to a budget; the per-unit difference orders units by the same contrast and meets any budget
    exactly. On a Wanda or SNIP map this is the rival scorer's protection set.

* **select** (units to train), least important first: the smallest I_S + I_U, the rule that defines the RU, so
  at the map's RU fraction (global allocation) the choice is the map's RU; on a Wanda map it is the
  "lowest-Wanda" set.

``allocation="global"`` ranks all units of the model together (each scorer puts its budget where its scores are
large); ``"per_block"`` gives every layer's MLP and attention block ``round(budget · width)`` units, so selectors
with one budget choose the same counts per layer and kind and differ only in which units of a block they take.
:func:`random_units_with_counts` draws random units with the per-block counts of any choice (seeded), the control
that every selection must beat. Budgets are fractions of units, rounded half up (as the unit types' sizes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch

from ..units import union_units
from .classification import UnitMap
from .codes import CU, SCU, UnitsDict, count

Purpose = Literal["protect", "select"]
ProtectionRule = Literal["types", "difference"]
Allocation = Literal["global", "per_block"]
PURPOSES: tuple[str, ...] = ("protect", "select")
PROTECTION_RULES: tuple[str, ...] = ("types", "difference")
ALLOCATIONS: tuple[str, ...] = ("global", "per_block")

#: Units as ``{layer: {kind: indices}}`` (layer as int or str).
UnitSet = Mapping[Union[int, str], Mapping[str, Sequence[int]]]
#: Block widths ``{kind: [width of layer 0, layer 1, ...]}``, as a map's ``fingerprint["widths"]``.
Widths = Mapping[str, Sequence[int]]


def choose_units(
    unit_map: UnitMap,
    budget: float,
    purpose: Purpose,
    *,
    rule: ProtectionRule = "types",
    allocation: Allocation = "global",
    kinds: Optional[Sequence[str]] = None,
) -> UnitsDict:
    """``budget`` (a fraction of all units) of ``unit_map``'s units for ``purpose`` (module docstring).

    Args:
        unit_map: the scores (and types) of one scorer on safety and utility data.
        budget: share of the units to choose, in [0, 1]; rounded half up per allocation scope.
        purpose: ``"protect"``: the most safety-specific units; ``"select"``: the least important ones.
        rule: how protection ranks (``"types"`` or ``"difference"``); ignored for selection.
        allocation: ``"global"`` (one ranking over the model) or ``"per_block"`` (the same share of every block).
        kinds: choose only units of these block kinds (e.g. ``("attn",)``), in the same ranking; the budget stays a
            share of all units, so attention-only and MLP-only choices of one budget are the same size (global
            allocation only). None: all.

    Returns ``{str(layer): {kind: sorted indices}}`` with every layer and kind listed. Ties break towards the lower
    layer, kind and index.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be a fraction in [0, 1], got {budget}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if rule not in PROTECTION_RULES:
        raise ValueError(f"rule must be one of {PROTECTION_RULES}, got {rule!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    unknown = sorted(set(kinds or ()) - set(unit_map.kinds))
    if unknown or (kinds is not None and not kinds):
        raise ValueError(f"kinds must name some of the map's block kinds {unit_map.kinds}, got {kinds}")
    if kinds is not None and allocation == "per_block":
        raise ValueError("kinds needs allocation='global': per block, a budget of all units is one of every block")
    order = _preference_order(unit_map, purpose, rule)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    eligible = unit_map._flatten(
        {
            kind: tuple(torch.full_like(t, kinds is None or kind in kinds, dtype=torch.bool) for t in scores)
            for kind, scores in unit_map.safety_scores.items()
        }
    )
    chosen = torch.zeros(order.numel(), dtype=torch.bool)
    for scope in unit_map._scopes(per_block=allocation == "per_block"):
        wanted, candidates = count(budget, scope.numel()), scope[eligible[scope]]
        if wanted > candidates.numel():
            raise ValueError(
                f"A budget of {budget:.1%} of all units is {wanted} units; the kinds {list(kinds or unit_map.kinds)} "
                f"have only {candidates.numel()}"
            )
        chosen[candidates[torch.argsort(position[candidates])][:wanted]] = True
    return unit_map._to_units_dict(chosen)


def random_units_with_counts(units: UnitSet, widths: Widths, seed: int = 0, *, exclude_given: bool = True) -> UnitsDict:
    """Random units with as many units per layer and kind as ``units``, drawn with a seeded generator.

    ``exclude_given=True`` draws from the units NOT in ``units``: "these units vs. others of the same size and
    place" (the ablation check); a block where ``units`` hold more than half of the units cannot be matched and
    raises ``ValueError``. ``exclude_given=False`` draws uniformly from all units of the block, the null
    hypothesis for a training control, which exists at every budget (72% of units included).
    """
    generator = torch.Generator().manual_seed(seed)
    control: UnitsDict = {}
    for layer, blocks in union_units(units).items():
        for kind, indices in blocks.items():
            candidates = torch.ones(_width(widths, kind, int(layer)), dtype=torch.bool)
            if exclude_given:
                candidates[indices] = False
            candidates = torch.nonzero(candidates).flatten()
            if len(indices) > candidates.numel():
                raise ValueError(
                    f"Layer {layer} {kind}: {len(indices)} units leave only {candidates.numel()} others to draw from"
                )
            picked = candidates[torch.randperm(candidates.numel(), generator=generator)[: len(indices)]]
            control.setdefault(layer, {})[kind] = sorted(picked.tolist())
    return control


def complement_units(units: UnitSet, widths: Widths) -> UnitsDict:
    """Every unit of the model NOT in ``units`` (``widths`` as :func:`unit_widths`), every layer and kind listed:
    what trains when ``units`` are frozen inside dense fine-tuning (the paper's own protection, Sec. 5.2)."""
    given = union_units(units)
    for layer, blocks in given.items():
        for kind, indices in blocks.items():
            width = _width(widths, kind, int(layer))
            if indices and not 0 <= indices[0] <= indices[-1] < width:
                raise ValueError(f"Layer {layer} {kind}: units {indices[0]}..{indices[-1]} outside width {width}")
    complement: UnitsDict = {}
    for kind, layer_widths in widths.items():
        for layer, width in enumerate(layer_widths):
            free = torch.ones(int(width), dtype=torch.bool)
            free[given.get(str(layer), {}).get(kind, [])] = False
            complement.setdefault(str(layer), {})[kind] = torch.nonzero(free).flatten().tolist()
    return complement


def counts_per_block(units: UnitSet) -> dict[tuple[int, str], int]:
    """The number of units per ``(layer, kind)`` of a unit set: what a random control must match."""
    return {(int(layer), kind): len(indices) for layer, blocks in units.items() for kind, indices in blocks.items()}


def unit_widths(unit_map: UnitMap) -> dict[str, Any]:
    """The block widths of the model ``unit_map`` was made for (``{kind: [width per layer]}``)."""
    return dict(unit_map.fingerprint["widths"])


def _width(widths: Widths, kind: str, layer: int) -> int:
    if kind not in widths or not 0 <= layer < len(widths[kind]):
        raise ValueError(f"Units name layer {layer} {kind}, which the model's widths {dict(widths)} do not have")
    return int(widths[kind][layer])


def _preference_order(unit_map: UnitMap, purpose: Purpose, rule: ProtectionRule) -> torch.Tensor:
    """Flat unit indices, the most preferred first (stable: ties keep the flat order)."""
    safety, utility = unit_map._ranking_values()
    if purpose == "select":
        return torch.sort(safety + utility, stable=True).indices
    order = torch.sort(safety - utility, descending=True, stable=True).indices
    if rule == "types":  # SCU, then CU, then the rest; D order kept within each group
        types = unit_map._flat_types()[order]
        group = torch.full_like(types, 2, dtype=torch.int64)
        group[types == CU] = 1
        group[types == SCU] = 0
        order = order[torch.sort(group, stable=True).indices]
    return order
