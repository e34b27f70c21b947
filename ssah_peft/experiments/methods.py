"""The method table: every fine-tuning method the experiments compare, each defined once.

A :class:`Method` says everything a run needs to know about how it trains: its peft config (none for full
fine-tuning), the units it trains or freezes, chosen from a :class:`~ssah_peft.UnitMap` by a :class:`UnitSelector`,
and which learning rate of the demo's settings it takes. The demo's stages and ``benchmarks/demo_sweep.py`` take
their methods from :data:`METHODS`; ``benchmarks/train_step.py`` (and ``adapter_size.py`` through it) build their
LoRA, protect and select configs with the same adapter builders. A method's name is its key there, its run
directory and its row in a report; no code reads anything out of the name.

Adding a method takes a selector and one line. Selectors are made by :func:`budget_selector` (a share of the units
to protect or to train, by :func:`ssah_peft.unit_map.choose_units`'s rules, from the map of any scorer), by
:func:`random_like` (random units with exactly the per-layer and per-kind counts of another selector, the
control of issue 17) or by :func:`complement_of` (every unit but another selector's); :data:`RANDOM_CONTROLS`
pairs each SSAH method with its control.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from peft import LoraConfig, PeftConfig

from ..analysis import units_dict
from ..tuner import SSAHConfig
from ..unit_map import (
    Allocation,
    ProtectionRule,
    Purpose,
    UnitMap,
    UnitsDict,
    choose_units,
    complement_units,
    random_units_with_counts,
    unit_widths,
)

# ----------------------------------------------------------------------------------------------------
# Adapter builders: (units, rank) -> peft config
# ----------------------------------------------------------------------------------------------------

AdapterBuilder = Callable[[Optional[UnitsDict], int], PeftConfig]


def lora_config(units: Optional[UnitsDict] = None, rank: int = 8) -> LoraConfig:
    """LoRA of rank ``rank`` on every linear layer but the output head, scaled by alpha = 2·rank; ``units`` is
    ignored. Protect mode uses the same rank and scaling, so the two differ only in the frozen units."""
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")


def protect_config(units: Optional[UnitsDict], rank: int = 8) -> SSAHConfig:
    """SSAH protect mode: a rank-``rank`` update (alpha = 2·rank, as :func:`lora_config`) with ``units`` frozen."""
    return SSAHConfig(units=units, mode="protect", r=rank, alpha=2 * rank)


def select_config(units: Optional[UnitsDict], rank: int = 8) -> SSAHConfig:
    """SSAH select mode: dense deltas of ``units`` only; ``rank`` is ignored."""
    return SSAHConfig(units=units, mode="select")


# ----------------------------------------------------------------------------------------------------
# Unit selectors: unit map -> units
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitSelector:
    """Chooses a method's units from a unit map: those it trains (select) or those it freezes (protect)."""

    name: str
    """What the units are, for messages and reports, e.g. ``"SCU + top CU"``."""
    choose: Callable[[UnitMap], UnitsDict]
    scorer: str = "variance"
    """The scoring method (``score_units(method=...)``) of the map it chooses from; :meth:`Method.units_of`
    refuses a map of another scorer."""

    def __call__(self, unit_map: UnitMap) -> UnitsDict:
        return self.choose(unit_map)


def budget_selector(
    budget: float,
    purpose: Purpose,
    *,
    rule: ProtectionRule = "types",
    allocation: Allocation = "global",
    scorer: str = "variance",
    kinds: Optional[tuple[str, ...]] = None,
) -> UnitSelector:
    """``budget`` (a share of all units) to protect or to select, chosen from a ``scorer`` map by
    :func:`ssah_peft.unit_map.choose_units` (``rule``, ``allocation`` and ``kinds`` as there)."""
    rule_name = f", {rule}" if purpose == "protect" else ""
    kinds_name = f", {'+'.join(kinds)} only" if kinds else ""
    name = f"{purpose} {budget:.1%} by {scorer} ({allocation}{rule_name}{kinds_name})"

    def choose(unit_map: UnitMap) -> UnitsDict:
        return choose_units(unit_map, budget, purpose, rule=rule, allocation=allocation, kinds=kinds)

    return UnitSelector(name, choose, scorer)


def random_like(selector: UnitSelector, seed: int = 0) -> UnitSelector:
    """Random units with exactly the per-layer and per-kind counts of ``selector``'s, drawn uniformly from all units
    of each block (seeded; :func:`ssah_peft.unit_map.random_units_with_counts`): the control for the unit choice."""

    def choose(unit_map: UnitMap) -> UnitsDict:
        return random_units_with_counts(selector(unit_map), unit_widths(unit_map), seed, exclude_given=False)

    return UnitSelector(f"random, as {selector.name} (seed {seed})", choose, selector.scorer)


def complement_of(selector: UnitSelector) -> UnitSelector:
    """Every unit but ``selector``'s: trained in select mode, it is dense fine-tuning of all output-projection units
    with ``selector``'s frozen, the paper's own protection (it froze units inside full fine-tuning, Sec. 5.2)."""

    def choose(unit_map: UnitMap) -> UnitsDict:
        return complement_units(selector(unit_map), unit_widths(unit_map))

    return UnitSelector(f"all but {selector.name}", choose, selector.scorer)


def _redundant(unit_map: UnitMap) -> UnitsDict:
    return unit_map.config_units("select")


def _safety_and_top_composite(unit_map: UnitMap) -> UnitsDict:
    return unit_map.config_units("protect")


def _safety_and_all_composite(unit_map: UnitMap) -> UnitsDict:
    return units_dict(unit_map, ["SCU", "CU"])


#: The redundant units (RU): the paper's alignment budget.
REDUNDANT = UnitSelector("RU", _redundant)
#: The "RU" of a Wanda map: as many units as the map's RU, those of the smallest Wanda scores I_S + I_U (the rule
#: that defines the RU, :func:`ssah_peft.unit_map.choose_units`), the rival scorer's alignment budget.
LOWEST_WANDA = UnitSelector("lowest Wanda", _redundant, scorer="wanda")
#: The safety-critical units plus the map's most safety-leaning composite units (``composite_fraction``).
SAFETY_AND_TOP_COMPOSITE = UnitSelector("SCU + top CU", _safety_and_top_composite)
#: The safety-critical and all composite units.
SAFETY_AND_ALL_COMPOSITE = UnitSelector("SCU + all CU", _safety_and_all_composite)


# ----------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One fine-tuning method of the comparisons."""

    name: str
    """Its key in :data:`METHODS`, its run directory and its name in results and reports."""
    adapter: Optional[AdapterBuilder]
    """Builds its peft config from its units and the LoRA rank; None: full fine-tuning (every weight trains)."""
    learning_rate_key: str
    """Its key in ``DemoConfig.align_learning_rates`` / ``attack_learning_rates``; methods that differ only in
    their units share one."""
    units: Optional[UnitSelector] = None
    """Chooses its units from a unit map; None: it needs no unit map."""
    freezes_units: bool = False
    """Whether ``units`` are held fixed (protect) rather than the only ones trained (select)."""

    def units_of(self, unit_map: Optional[UnitMap]) -> Optional[UnitsDict]:
        """The units its adapter is given, chosen from ``unit_map``; None for a method without units."""
        if self.units is None:
            return None
        if unit_map is None:
            raise ValueError(f"Method {self.name!r} chooses its units ({self.units.name}) from a unit map; give one")
        scorer = unit_map.calibration.get("safety", {}).get("method", "variance")
        if scorer != self.units.scorer:
            raise ValueError(
                f"Method {self.name!r} chooses its units ({self.units.name}) from a {self.units.scorer} map, "
                f"got a {scorer} map"
            )
        return self.units(unit_map)

    def peft_config(self, units: Optional[UnitsDict] = None, rank: int = 8) -> Optional[PeftConfig]:
        """Its adapter for ``units`` (from :meth:`units_of`); None for full fine-tuning."""
        return None if self.adapter is None else self.adapter(units, rank)


def ssah_protect(name: str, frozen: UnitSelector) -> Method:
    """A protect-mode method: LoRA-like training with the ``frozen`` units held at exactly zero update."""
    return Method(name, protect_config, "ssah_protect", units=frozen, freezes_units=True)


def ssah_select(name: str, trained: UnitSelector) -> Method:
    """A select-mode method: only the ``trained`` units train."""
    return Method(name, select_config, "ssah_select", units=trained)


FULL = Method("full", None, "full")
LORA = Method("lora", lora_config, "lora")
SSAH_SELECT_RU = ssah_select("ssah_select", REDUNDANT)
SSAH_PROTECT_TOP_CU = ssah_protect("ssah_protect_top_cu", SAFETY_AND_TOP_COMPOSITE)
SSAH_PROTECT_ALL_CU = ssah_protect("ssah_protect_all_cu", SAFETY_AND_ALL_COMPOSITE)
# Controls: random units of exactly the per-layer and per-kind counts of the SSAH method's units, same training.
SSAH_SELECT_RANDOM = ssah_select("ssah_select_random", random_like(REDUNDANT))
# The rival scorer's choice of the same budget (issue 17), not a demo stage: benchmarks/demo_sweep.py aligns with it.
SELECT_LOWEST_WANDA = ssah_select("select_lowest_wanda", LOWEST_WANDA)
SSAH_PROTECT_TOP_CU_RANDOM = ssah_protect("ssah_protect_top_cu_random", random_like(SAFETY_AND_TOP_COMPOSITE))
SSAH_PROTECT_ALL_CU_RANDOM = ssah_protect("ssah_protect_all_cu_random", random_like(SAFETY_AND_ALL_COMPOSITE))

#: Each SSAH method's name and its random control.
RANDOM_CONTROLS: dict[str, Method] = {
    SSAH_SELECT_RU.name: SSAH_SELECT_RANDOM,
    SSAH_PROTECT_TOP_CU.name: SSAH_PROTECT_TOP_CU_RANDOM,
    SSAH_PROTECT_ALL_CU.name: SSAH_PROTECT_ALL_CU_RANDOM,
}

#: Every method by name.
METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        FULL,
        LORA,
        SSAH_SELECT_RU,
        SSAH_PROTECT_TOP_CU,
        SSAH_PROTECT_ALL_CU,
        *RANDOM_CONTROLS.values(),
        SELECT_LOWEST_WANDA,
    )
}


def method_named(name: str) -> Method:
    """The method called ``name`` in :data:`METHODS`; ``KeyError`` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"Unknown method {name!r}; known: {', '.join(METHODS)}") from None
