"""The method table: every fine-tuning method the experiments compare, each defined once.

A :class:`~ssah_peft.training.Method` (defined with the standard methods and the adapter builders in
:mod:`ssah_peft.training.methods`, the layer ``ssah-peft finetune`` trains with too, and re-exported here) says
everything a run needs to know about how it trains: its peft config (none for full fine-tuning), the units it
trains or freezes, chosen from a :class:`~ssah_peft.UnitMap` by a :class:`UnitSelector`, and which learning rate
of the demo's settings it takes. The demo's stages and ``benchmarks/demo_sweep.py`` take their methods from
:data:`METHODS`. A method's name is its key there, its run directory and its row in a report; no code reads
anything out of the name.

Adding a method takes a selector and one line. Selectors are made by :func:`budget_selector` (a share of the units
to protect or to train, by :func:`ssah_peft.unit_map.choose_units`'s rules, from the map of any scorer), by
:func:`random_like` (random units with exactly the per-layer and per-kind counts of another selector, the
control of issue 17), by :func:`random_draw` (the same from a generator of its own per key: independent draws)
or by :func:`complement_of` (every unit but another selector's); :data:`RANDOM_CONTROLS`
pairs each SSAH method with its control. ``budget_selector`` and ``random_like`` are defined in
:mod:`ssah_peft.training.methods` (``ssah-peft finetune``'s ``--chooser``/``--budget`` and ``--control random`` use
them, and the fine-tuning layer does not import the experiments) and re-exported here.
"""

from __future__ import annotations

import hashlib

from ..training.methods import (  # noqa: F401 - the standard methods and builders, re-exported with the table
    FULL,
    LORA,
    LOWEST_WANDA,
    REDUNDANT,
    SAFETY_AND_ALL_COMPOSITE,
    SAFETY_AND_TOP_COMPOSITE,
    SSAH_PROTECT_ALL_CU,
    SSAH_PROTECT_TOP_CU,
    SSAH_SELECT_RU,
    AdapterBuilder,
    Method,
    UnitSelector,
    budget_selector,
    lora_config,
    protect_config,
    protect_out_proj_config,
    random_like,
    select_config,
    ssah_protect,
    ssah_protect_out_proj,
    ssah_select,
)
from ..unit_map import (
    UnitMap,
    UnitsDict,
    complement_units,
    random_units_with_counts,
    unit_widths,
)

# ----------------------------------------------------------------------------------------------------
# Unit selectors: unit map -> units (the selectors of the comparisons; the standard ones are in ssah_peft.training)
# ----------------------------------------------------------------------------------------------------


def draw_seed(*key: object) -> int:
    """A 64-bit generator seed from ``key`` (e.g. chooser, budget, draw index, training seed): sha256 of its
    ``repr``, so every key has a generator of its own, the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(repr(key).encode("utf-8")).digest()[:8], "little")


def random_draw(selector: UnitSelector, *key: object) -> UnitSelector:
    """Random units with exactly the per-layer and per-kind counts of ``selector``'s, as :func:`random_like`, from
    a generator of their own seeded by ``key`` (:func:`draw_seed`): draws of different keys are independent (not
    prefixes of one permutation, as :func:`random_like`'s draws of one seed at several budgets are)."""

    def choose(unit_map: UnitMap) -> UnitsDict:
        return random_units_with_counts(selector(unit_map), unit_widths(unit_map), draw_seed(*key), exclude_given=False)

    return UnitSelector(f"random, as {selector.name} (draw {key})", choose, selector.scorer)


def complement_of(selector: UnitSelector) -> UnitSelector:
    """Every unit but ``selector``'s: trained in select mode, it is dense fine-tuning of all output-projection units
    with ``selector``'s frozen, the paper's own protection (it froze units inside full fine-tuning, Sec. 5.2)."""

    def choose(unit_map: UnitMap) -> UnitsDict:
        return complement_units(selector(unit_map), unit_widths(unit_map))

    return UnitSelector(f"all but {selector.name}", choose, selector.scorer)


# ----------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------

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
