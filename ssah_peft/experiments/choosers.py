"""The frontier's choosers: who picks the units a frontier run freezes, each defined once (issues 25 and 26).

A :class:`Chooser` says everything a run needs to know about its choice of units: the unit map it reads
(:data:`~.chooser_maps.UNIT_MAPS`: the scorer, its tokens, how the map is made), how it picks a budget of units
from that map (:func:`ssah_peft.unit_map.choose_units`'s ``rule`` and ``kinds``) and the name of its random
control. :data:`CHOOSERS` holds every chooser by name, so adding a selector is one entry here (and, for a new
scorer, one in :data:`~.chooser_maps.UNIT_MAPS`).

Every chooser has a random control: random units with exactly the chooser's per-layer and per-kind counts at the
same budget (``random`` for ``ssah``, ``random_<chooser>`` for the others), the null that a choice must beat. A
control comes in two kinds of draws:

* ``draw=None``, the frontier's first sweep: one draw per training seed, from a generator seeded with the seed
  alone (:func:`.methods.random_like`), so the draws of one seed at several budgets are prefixes of one
  permutation per block: three independent draws in all. Kept so the stored results keep their units.
* ``draw=0, 1, ...``: every (chooser, budget, draw, seed) has a generator of its own, seeded by a hash of the four
  (:func:`.methods.random_draw`), so draws are independent across draw indices, seeds, budgets and choosers (issue
  26: at least five per chooser and budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..unit_map import ProtectionRule
from .chooser_maps import UNIT_MAPS
from .methods import UnitSelector, budget_selector, random_draw, random_like


@dataclass(frozen=True)
class Chooser:
    """One way of choosing the units a frontier run freezes."""

    name: str
    """Its key in :data:`CHOOSERS` and its name in run directories and results."""
    unit_map: str
    """The key of the unit map it chooses from in :data:`~.chooser_maps.UNIT_MAPS`."""
    rule: ProtectionRule = "difference"
    """How it ranks the map's units (:func:`ssah_peft.unit_map.choose_units`): ``"types"`` (SCU, then CU, then the
    rest, each by I_S − I_U) or ``"difference"`` (by I_S − I_U alone; a one-score map's score)."""
    kinds: Optional[tuple[str, ...]] = None
    """The block kinds it takes its whole budget from; None: all."""
    description: str = ""
    """What it chooses, for the summaries."""
    control_name: str = ""
    """The name of its random control's runs; default ``random_<name>``."""

    @property
    def control(self) -> str:
        """The name of its random control: random units of its per-layer and per-kind counts."""
        return self.control_name or f"random_{self.name}"

    @property
    def runs(self) -> tuple[str, str]:
        """The names of its runs and of its control's."""
        return self.name, self.control

    def selector(self, budget: float) -> UnitSelector:
        """The units it freezes at ``budget`` (a share of all units, global ranking as in the paper)."""
        scorer = UNIT_MAPS[self.unit_map].scorer
        return budget_selector(budget, "protect", rule=self.rule, scorer=scorer, kinds=self.kinds)

    def random_control(self, budget: float, seed: int, draw: Optional[int] = None) -> UnitSelector:
        """Random units with the per-layer and per-kind counts of :meth:`selector`'s at ``budget``: the draw of
        ``seed`` (``draw=None``) or the independent draw ``draw`` of ``seed`` (module docstring)."""
        chosen = self.selector(budget)
        if draw is None:
            return random_like(chosen, seed)
        return random_draw(chosen, self.control, budget, draw, seed)


def _register(*choosers: Chooser) -> dict[str, Chooser]:
    return {chooser.name: chooser for chooser in choosers}


#: Every chooser by name.
CHOOSERS: dict[str, Chooser] = _register(
    Chooser(
        "ssah", "variance", "types", description="SCU, then CU, by I_S − I_U (variance scores)", control_name="random"
    ),
    Chooser("wanda", "wanda", description="the Wanda scores' difference I_S − I_U (Wei et al. 2024)"),
    Chooser("snip", "snip", description="the SNIP scores' difference I_S − I_U (Wei et al. 2024)"),
    Chooser("ssah_std", "variance_std", "types", description="SSAH on I_S and I_U z-scored per layer and kind"),
    Chooser("ssah_attn", "variance", "types", ("attn",), "SSAH's order, the whole budget from attention channels"),
    Chooser("ssah_mlp", "variance", "types", ("mlp",), "SSAH's order, the whole budget from MLP neurons"),
    Chooser("ssah_prompt", "variance_prompt", "types", description="SSAH scored on the prompt tokens"),
    Chooser("refusal_direction", "refusal_direction", description="each unit's write onto the refusal direction"),
    Chooser("alignment_delta", "alignment_delta", description="the units whose slices the alignment changed most"),
    Chooser("margin_grad", "margin_grad", description="attribution of the refusal margin, harmful minus utility"),
    Chooser("conflict", "conflict", description="margin a task step takes away per unit of task progress"),
)


def chooser_named(name: str) -> tuple[Chooser, bool]:
    """The chooser of the runs called ``name`` and whether they are its random control (``random``,
    ``random_<chooser>``); ``ValueError`` naming the known ones otherwise."""
    for chooser in CHOOSERS.values():
        if name in chooser.runs:
            return chooser, name == chooser.control
    known = [n for chooser in CHOOSERS.values() for n in chooser.runs]
    raise ValueError(f"Unknown chooser {name!r}; known: {', '.join(known)}")
