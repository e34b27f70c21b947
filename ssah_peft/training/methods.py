"""The methods a run trains with: each fine-tuning method defined once, with its adapter and its units.

A :class:`Method` says everything a run needs to know about how it trains: its peft config (none for full
fine-tuning), the units it trains or freezes, chosen from a :class:`~ssah_peft.UnitMap` by a :class:`UnitSelector`,
and which learning rate of a run's settings it takes. ``ssah-peft finetune`` picks its method here
(:func:`ssah_peft.finetuning.options.method_for`); the experiments' method table
(:data:`ssah_peft.experiments.methods.METHODS`) holds these methods with their random controls and the selectors
the comparisons add. ``benchmarks/train_step.py`` (and ``adapter_size.py`` through it) build their LoRA, protect
and select configs with the same adapter builders. A method's name is its key there, its run directory and its row
in a report; no code reads anything out of the name. :func:`budget_selector` (a share of the units ranked by a
scorer) and :func:`random_like` (random units of a selector's counts) are here, not with the experiments' selectors,
because ``ssah-peft finetune`` builds its ``--chooser``/``--budget`` units and its ``--control random`` with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from peft import LoraConfig, PeftConfig

from ..tuner import SSAHConfig
from ..unit_map import (
    Allocation,
    ProtectionRule,
    Purpose,
    UnitMap,
    UnitsDict,
    choose_units,
    random_units_with_counts,
    unit_widths,
)
from ..units import union_units

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


def protect_out_proj_config(units: Optional[UnitsDict], rank: int = 8) -> SSAHConfig:
    """Protect mode freezing only the units' output-projection columns (``unit_parts="out_proj"``): every unit of
    a block then freezes as many parameters (the hidden size), so choices of equal per-block counts freeze equal
    parameter counts; with all parts, a unit of a partly chosen attention head freezes the head's shared q/k rows
    too, more of them for scattered random units than for clustered ones."""
    return SSAHConfig(units=units, mode="protect", r=rank, alpha=2 * rank, unit_parts="out_proj")


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


def _redundant(unit_map: UnitMap) -> UnitsDict:
    return unit_map.config_units("select")


def _safety_and_top_composite(unit_map: UnitMap) -> UnitsDict:
    return unit_map.config_units("protect")


def _safety_and_all_composite(unit_map: UnitMap) -> UnitsDict:
    return union_units(unit_map.units_of("SCU"), unit_map.units_of("CU"))


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
    of each block (seeded; :func:`ssah_peft.unit_map.random_units_with_counts`): the control for the unit choice.
    Only the counts reach the draw, not the chosen positions, so the control is independent of the choice. Here,
    beside the standard selectors, because ``ssah-peft finetune --control random`` trains it as well as the
    experiments (which re-export it)."""

    def choose(unit_map: UnitMap) -> UnitsDict:
        return random_units_with_counts(selector(unit_map), unit_widths(unit_map), seed, exclude_given=False)

    return UnitSelector(f"random, as {selector.name} (seed {seed})", choose, selector.scorer)


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
    """Its key in the method table (:data:`ssah_peft.experiments.methods.METHODS`), its run directory and its
    name in results and reports."""
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


def ssah_protect_out_proj(name: str, frozen: UnitSelector) -> Method:
    """:func:`ssah_protect` with only the ``frozen`` units' output-projection columns held
    (:func:`protect_out_proj_config`): the arm whose choices and controls freeze equal parameter counts."""
    return Method(name, protect_out_proj_config, "ssah_protect", units=frozen, freezes_units=True)


def ssah_select(name: str, trained: UnitSelector) -> Method:
    """A select-mode method: only the ``trained`` units train."""
    return Method(name, select_config, "ssah_select", units=trained)


FULL = Method("full", None, "full")
LORA = Method("lora", lora_config, "lora")
SSAH_SELECT_RU = ssah_select("ssah_select", REDUNDANT)
SSAH_PROTECT_TOP_CU = ssah_protect("ssah_protect_top_cu", SAFETY_AND_TOP_COMPOSITE)
SSAH_PROTECT_ALL_CU = ssah_protect("ssah_protect_all_cu", SAFETY_AND_ALL_COMPOSITE)
