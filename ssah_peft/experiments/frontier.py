"""The protection frontier (issue 17): ASR after a fine-tuning attack against task accuracy after it, for budgets of
frozen units chosen by each chooser and at random, with full fine-tuning, LoRA and dense training of every unit as
reference points.

A module of its own because the frontier is the project's answer to "do the chosen units matter?": at the same
task accuracy, does freezing SSAH's units keep more refusals than freezing as many other units? One point is one
attack run (:func:`.stages.attack_result`, exactly as the demo's stage 4) of a :class:`FrontierRun`; a chooser
(:data:`.choosers.CHOOSERS`) picks a budget of units from its unit map, and its random control draws units with
exactly the chooser's per-layer and per-kind counts at that budget (``random`` for SSAH, ``random_<chooser>`` for
the others; one draw per seed, or independent draws, :mod:`.choosers`). The settings (:data:`SETTINGS`) freeze them:

* ``protect``: SSAH protect mode, a LoRA-like update of every linear layer with the units' slices held at zero
  (what the library offers as "LoRA that cannot touch the safety units");
* ``dense``: select mode on every other unit, i.e. dense fine-tuning of all output-projection units but the frozen
  ones: the paper's own setting (it froze units inside full fine-tuning, Sec. 5.2);
* ``protect_out_proj``: protect mode holding only the units' output-projection columns, so a choice and its
  control freeze the same number of parameters (issue 26), outside the default sweep.

``benchmarks/frontier.py`` runs the sweep; its tables are :mod:`.frontier_tables`, its figure
:mod:`.frontier_figure` (which the demo's report draws its own attack runs with). Rates are pooled over seeds for
Wilson intervals and averaged per seed for mean ± sd; a chooser is compared with random by the paired difference
over seeds (same seed: same training data order and adapter init).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..unit_map import UnitMap
from .chooser_maps import UnitMaps, map_key
from .choosers import CHOOSERS, chooser_named
from .config import ATTACK_SETS
from .frontier_figure import FrontierPoint, plot_frontier
from .methods import FULL, LORA, Method, UnitSelector, complement_of, select_config, ssah_protect, ssah_protect_out_proj

# FrontierPoint and plot_frontier (:mod:`.frontier_figure`) are re-exported for the demo's report.
__all__ = [
    "ALL_CHOOSERS",
    "BUDGETS",
    "DEFAULT_CHOOSERS",
    "DEFAULT_SETTINGS",
    "REFERENCES",
    "SETTINGS",
    "FrontierPoint",
    "FrontierRun",
    "OTHER_CHOOSERS",
    "check_runs",
    "dense_training",
    "frontier_runs",
    "plot_frontier",
    "protection_selector",
]

#: Shares of all units frozen: about the SCU alone, SCU + top CU (the paper's 6%), 20%, 40%, SCU + all CU.
BUDGETS: tuple[float, ...] = (0.013, 0.075, 0.2, 0.4, 0.72)
#: The choosers of the default sweep: SSAH's types (SCU, then CU by I_S − I_U), the rival scorers' safety
#: attribution (Wanda or SNIP score difference, Wei et al. 2024) and random units with SSAH's per-layer counts. Every
#: other chooser of :data:`.choosers.CHOOSERS` and every ``random_<chooser>`` control runs when named.
DEFAULT_CHOOSERS: tuple[str, ...] = ("ssah", "wanda", "snip", "random")
#: The choosers outside the default sweep, each followed by its random control (a summary draws them apart).
OTHER_CHOOSERS: tuple[str, ...] = tuple(
    name for chooser in CHOOSERS.values() if chooser.name not in DEFAULT_CHOOSERS for name in chooser.runs
)
#: The runs of every chooser and control: the default sweep's, the controls of its choosers with their own counts
#: (``random_wanda``, ``random_snip``), then :data:`OTHER_CHOOSERS`; the order of a sweep's rows.
ALL_CHOOSERS: tuple[str, ...] = (
    DEFAULT_CHOOSERS
    + tuple(c.control for c in CHOOSERS.values() if c.name in DEFAULT_CHOOSERS and c.control not in DEFAULT_CHOOSERS)
    + OTHER_CHOOSERS
)


def dense_training(name: str, frozen: UnitSelector) -> Method:
    """Select mode on every unit but ``frozen``'s, at full fine-tuning's learning rate: dense fine-tuning of the
    output-projection units (embeddings, norms and the output head stay as they are) with ``frozen`` held."""
    return Method(name, select_config, FULL.learning_rate_key, units=complement_of(frozen))


#: How each setting trains with a run's frozen units: (run name, frozen units) -> method.
SETTINGS: dict[str, Callable[[str, UnitSelector], Method]] = {
    "protect": ssah_protect,
    "dense": dense_training,
    "protect_out_proj": ssah_protect_out_proj,
}
#: The settings of the default sweep.
DEFAULT_SETTINGS: tuple[str, ...] = ("protect", "dense")


def protection_selector(chooser: str, budget: float, seed: int, draw: Optional[int] = None) -> UnitSelector:
    """The units the runs called ``chooser`` freeze at ``budget`` (a share of all units): a chooser's choice, or
    for its random control (``random``, ``random_<chooser>``) the draw of ``seed`` (``draw=None``) or its
    independent draw ``draw`` (:meth:`.choosers.Chooser.random_control`)."""
    entry, is_control = chooser_named(chooser)
    return entry.random_control(budget, seed, draw) if is_control else entry.selector(budget)


@dataclass(frozen=True)
class FrontierRun:
    """One point of the frontier: an attack run with ``budget`` of the units chosen by ``chooser`` frozen in
    ``setting``, or a reference (``setting == "reference"``, ``budget`` 0: :data:`REFERENCES`)."""

    attack: str
    setting: str
    chooser: str
    budget: float
    seed: int
    draw: Optional[int] = None
    """The independent random draw of a control run (:mod:`.choosers`); None: the seed's own draw."""

    def __post_init__(self) -> None:
        if self.draw is not None and (self.setting == "reference" or not chooser_named(self.chooser)[1]):
            raise ValueError(f"Only a random control's run has draws; {self.chooser!r} ({self.setting}) has none")

    @property
    def name(self) -> str:
        """The run's directory name and its ``method`` in results, e.g. ``protect-ssah-7.5`` or
        ``protect-random_snip-20-draw3``."""
        if self.setting == "reference":
            return self.chooser
        draw = "" if self.draw is None else f"-draw{self.draw}"
        return f"{self.setting}-{self.chooser}-{self.budget * 100:g}{draw}"

    def run_dir(self, root: Path) -> Path:
        return root / self.attack / f"seed{self.seed}" / self.name

    def method(self) -> Method:
        """The method this run trains with; a ``dense`` run takes full fine-tuning's learning rate."""
        if self.setting == "reference":
            return REFERENCES[self.chooser]
        if self.setting not in SETTINGS:
            raise ValueError(f"Unknown setting {self.setting!r}; known: {', '.join(SETTINGS)}, reference")
        return SETTINGS[self.setting](self.name, protection_selector(self.chooser, self.budget, self.seed, self.draw))

    @property
    def scorer(self) -> Optional[str]:
        """The key of the unit map the run chooses from in a sweep's maps (:func:`.chooser_maps.map_key`); None
        for a reference without units."""
        if self.setting == "reference":
            return None if REFERENCES[self.chooser].units is None else "variance"
        return map_key(chooser_named(self.chooser)[0].unit_map, self.attack)

    def unit_map(self, maps: UnitMaps) -> Optional[UnitMap]:
        """The unit map the run chooses from, from (or made into) a sweep's ``maps``; None for a reference without
        units."""
        if self.scorer is None:
            return None
        source = "variance" if self.setting == "reference" else chooser_named(self.chooser)[0].unit_map
        return maps.get(source, self.attack)


#: The reference points: full fine-tuning, LoRA, and dense training with nothing frozen (the ``dense`` setting at
#: budget 0, which unlike full fine-tuning leaves embeddings, norms and the output head as they are).
REFERENCES: dict[str, Method] = {
    "full": FULL,
    "lora": LORA,
    "dense": dense_training("dense", UnitSelector("no units", lambda unit_map: {})),
}


def frontier_runs(
    budgets: Sequence[float] = BUDGETS,
    choosers: Sequence[str] = DEFAULT_CHOOSERS,
    settings: Sequence[str] = DEFAULT_SETTINGS,
    attacks: Sequence[str] = ATTACK_SETS,
    seeds: Sequence[int] = (0, 1, 2),
    draws: Optional[Sequence[int]] = None,
) -> list[FrontierRun]:
    """Every run of a sweep, seed by seed (an interrupted sweep has whole seeds first): per attack the references,
    then every setting, budget and chooser. ``dense`` runs only SSAH and random (a rival scorer's dense runs would
    double the sweep's time). A random control runs once per seed (``draws=None``) or once per independent draw
    in ``draws``."""
    runs = []
    for seed in seeds:
        for attack in attacks:
            runs += [FrontierRun(attack, "reference", name, 0.0, seed) for name in REFERENCES]
            for setting in settings:
                for budget in budgets:
                    for chooser in choosers:
                        if setting == "dense" and chooser not in ("ssah", "random"):
                            continue
                        control = chooser_named(chooser)[1]
                        for draw in draws if control and draws is not None else (None,):
                            runs.append(FrontierRun(attack, setting, chooser, budget, seed, draw))
    return runs


def check_runs(runs: Iterable[FrontierRun], maps: Mapping[str, UnitMap]) -> None:
    """Choose every run's units from its unit map in ``maps`` now: a budget a chooser cannot meet (more attention
    units than the model has, say) is a ``ValueError`` naming the run before any run trains, not after hours of the
    others."""
    for run in runs:
        try:
            run.method().units_of(maps.get(run.scorer) if run.scorer else None)
        except ValueError as error:
            raise ValueError(f"{run.name} ({run.attack}, seed {run.seed}): {error}") from None
