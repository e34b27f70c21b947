"""The unit maps the frontier's choosers read (:mod:`.choosers`), each defined once: which scorer, on which data,
and how the map is made from the demo's aligned model.

A :class:`UnitMapSource` names a map and the scorer its calibration records (what a chooser's
:class:`~.methods.UnitSelector` checks the map against), and makes the map; :data:`UNIT_MAPS` holds them by name.
Maps of two scores (variance, Wanda, SNIP) are classified from safety and utility scores as the demo's are; the
attribution scores of :mod:`ssah_peft.scoring.attribution` give one score per unit, kept as a map whose utility
scores are zero (:func:`one_score_map`), so that ``choose_units(rule="difference")`` ranks units by the score and
every chooser takes its budget by the same rule. ``conflict`` is computed from the fine-tuning data, so it has a
map per attack (:attr:`UnitMapSource.per_attack`).

:class:`UnitMaps` makes the maps a sweep needs, each once, caching every scored map as a unit-map file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from ..analysis.scan import reclassified
from ..data import load_builtin
from ..evaluate.margin import margin_inputs, refusal_margin_terms
from ..scoring import TokenSelection, UnitScores, build_calibration_batches
from ..scoring.attribution import (
    alignment_delta_scores,
    conflict_scores,
    margin_attribution_scores,
    refusal_direction_scores,
)
from ..unit_map import UnitMap
from .caching import cached_artifact
from .config import DemoConfig
from .data import attack_records, spread
from .measures import unit_map_of
from .stages import ModelLoader


@dataclass
class UnitMaps:
    """The unit maps of a sweep, made on first use (:meth:`get`) and cached under ``cache_dir`` as
    ``unitmap_<key>.safetensors`` where their source says so; ``maps`` may start with maps made elsewhere (the
    demo's variance map)."""

    config: DemoConfig
    load_aligned: ModelLoader
    """A fresh copy of the aligned model the choosers choose from, and its tokenizer."""
    load_base: Optional[ModelLoader] = None
    """A fresh copy of the model before the alignment (for ``alignment_delta``)."""
    cache_dir: Optional[Path] = None
    maps: dict[str, UnitMap] = field(default_factory=dict)

    def get(self, source: str, attack: str) -> UnitMap:
        """The map of ``UNIT_MAPS[source]`` for runs attacking with ``attack``, made now unless made before."""
        key = map_key(source, attack)
        if key not in self.maps:
            recipe = UNIT_MAPS[source]

            def make() -> UnitMap:
                return recipe.make(self, attack)

            if recipe.cached and self.cache_dir is not None:
                self.maps[key] = cached_artifact(self.cache_dir / f"unitmap_{key}.safetensors", make, UnitMap.load)
            else:
                self.maps[key] = make()
        return self.maps[key]

    def base(self) -> tuple[Any, Any]:
        """A fresh copy of the model before the alignment, and its tokenizer."""
        if self.load_base is None:
            raise ValueError("This map compares the aligned model with the model before alignment; give load_base")
        return self.load_base()


@dataclass(frozen=True)
class UnitMapSource:
    """How the unit map of a chooser is made."""

    name: str
    """Its key in :data:`UNIT_MAPS` (and, for maps of one attack, the start of its key in a sweep's maps)."""
    scorer: str
    """The scoring method the map's calibration records: what a chooser's selector checks the map against."""
    tokens: TokenSelection = "response"
    """The tokens of the calibration exchanges the scoring pass reads (:func:`ssah_peft.build_calibration_batches`);
    a map with :attr:`derive` reads what that function reads (the prompts' last tokens for ``refusal_direction``)."""
    derive: Optional[Callable[[UnitMaps, str], UnitMap]] = None
    """``derive(maps, attack)``: the map, for a map that is not the demo's classification of ``scorer`` on
    ``tokens`` (:func:`.measures.unit_map_of`): an attribution score, or another map reclassified."""
    per_attack: bool = False
    """Whether the map depends on the attack's fine-tuning data (one map per attack)."""
    cached: bool = True
    """Whether the map is written to the sweep's cache (not for maps derived in an instant from another)."""

    def make(self, maps: UnitMaps, attack: str) -> UnitMap:
        """The map, from the models and data of ``maps`` (and its other maps)."""
        if self.derive is not None:
            return self.derive(maps, attack)
        config = maps.config
        return unit_map_of(*maps.load_aligned(), config, config.unit_fractions, method=self.scorer, tokens=self.tokens)


def map_key(source: str, attack: str) -> str:
    """The key of the map of ``source`` for runs of ``attack`` in a sweep's maps: its name, or ``<name>_<attack>``
    for a map of one attack."""
    return f"{source}_{attack}" if UNIT_MAPS[source].per_attack else source


def standardized(unit_map: UnitMap) -> UnitMap:
    """``unit_map`` classified again from its own scores with I_S and I_U z-scored per layer and block kind."""
    return reclassified(unit_map, standardize=True)


def one_score_map(scores: UnitScores, config: DemoConfig) -> UnitMap:
    """A unit map ranking units by one score: ``scores`` as I_S, zero as I_U, so that D = I_S − I_U is the score
    (the types are classified as any map's, at ``config``'s fractions, but no chooser of one score reads them)."""
    zero = {kind: tuple(torch.zeros_like(t) for t in per_layer) for kind, per_layer in scores.scores.items()}
    utility = replace(scores, scores=zero, metadata={"note": "zero: the map ranks units by one score"})
    return UnitMap.from_scores(
        scores, utility, **config.unit_fractions, composite_fraction=config.top_composite_fraction
    )


def _calibration_prompts(maps: UnitMaps, name: str) -> list[dict[str, Any]]:
    return spread(load_builtin(name), maps.config.calibration_pairs)


def _refusal_direction(maps: UnitMaps, attack: str) -> UnitMap:
    model, tokenizer = maps.load_aligned()
    batches = [
        build_calibration_batches(tokenizer, _calibration_prompts(maps, name), tokens="prompt")
        for name in ("safety_calibration", "utility_calibration")
    ]
    metadata = {"harmful": "safety_calibration", "harmless": "utility_calibration"}
    scores = refusal_direction_scores(model, *batches, show_progress_bar=maps.config.show_progress, metadata=metadata)
    return one_score_map(scores, maps.config)


def _alignment_delta(maps: UnitMaps, attack: str) -> UnitMap:
    scores = alignment_delta_scores(maps.load_aligned()[0], maps.base()[0], metadata={"base": maps.config.model})
    return one_score_map(scores, maps.config)


def _margin_batches(tokenizer: Any, records: Sequence[dict[str, Any]], batch_size: int = 8) -> list[Any]:
    return margin_inputs(tokenizer, [record["prompt"] for record in records], batch_size=batch_size)


def _margin_grad(maps: UnitMaps, attack: str) -> UnitMap:
    model, tokenizer = maps.load_aligned()
    harmful, utility = (  # one prompt per batch: each prompt's backward then runs through its own rows only
        _margin_batches(tokenizer, _calibration_prompts(maps, name), batch_size=1)
        for name in ("safety_calibration", "utility_calibration")
    )
    scores = margin_attribution_scores(
        model,
        harmful,
        utility,
        refusal_margin_terms,
        show_progress_bar=maps.config.show_progress,
        metadata={"harmful": "safety_calibration", "utility": "utility_calibration"},
    )
    return one_score_map(scores, maps.config)


def _conflict(maps: UnitMaps, attack: str) -> UnitMap:
    """From a sample of the attack's own training records (as many as the calibration pairs) and the harmful
    calibration prompts; records with a system turn (the identity shift) are batched per system turn."""
    model, tokenizer = maps.load_aligned()
    sample = spread(attack_records(attack, maps.config), maps.config.calibration_pairs)
    task = []
    for system in dict.fromkeys(record.get("system") for record in sample):
        pairs = [record for record in sample if record.get("system") == system]
        task += build_calibration_batches(tokenizer, pairs, max_length=maps.config.max_length, system_prompt=system)
    harmful = _margin_batches(tokenizer, _calibration_prompts(maps, "safety_calibration"))
    metadata = {"task": attack, "task_records": len(sample), "harmful": "safety_calibration"}
    scores = conflict_scores(
        model, task, harmful, refusal_margin_terms, show_progress_bar=maps.config.show_progress, metadata=metadata
    )
    return one_score_map(scores, maps.config)


def _sources(*sources: UnitMapSource) -> dict[str, UnitMapSource]:
    return {source.name: source for source in sources}


#: Every unit map a chooser reads, by name.
UNIT_MAPS: dict[str, UnitMapSource] = _sources(
    UnitMapSource("variance", "variance"),
    UnitMapSource(
        "variance_std", "variance", derive=lambda maps, attack: standardized(maps.get("variance", attack)), cached=False
    ),
    UnitMapSource("variance_prompt", "variance", tokens="prompt"),
    UnitMapSource("wanda", "wanda"),
    UnitMapSource("snip", "snip"),
    UnitMapSource("refusal_direction", "refusal_direction", derive=_refusal_direction),
    UnitMapSource("alignment_delta", "alignment_delta", derive=_alignment_delta),
    UnitMapSource("margin_grad", "margin_grad", derive=_margin_grad),
    UnitMapSource("conflict", "conflict", derive=_conflict, per_attack=True),
)


#: Where a demo run keeps what a frontier sweep attacks: the merged aligned model and its variance unit map.
DEMO_ALIGNED_MODEL = Path("align") / "aligned_model"
DEMO_ALIGNED_MAP = Path("units") / "unitmap_aligned.safetensors"


def missing_demo_outputs(demo_dir: Path) -> list[Path]:
    """The files of a demo run a frontier sweep needs that ``demo_dir`` lacks (``make demo`` stages 1-3 make them)."""
    needed = (demo_dir / DEMO_ALIGNED_MODEL / "config.json", demo_dir / DEMO_ALIGNED_MAP)
    return [path for path in needed if not path.is_file()]


def sweep_unit_maps(config: DemoConfig, demo_dir: Path, cache_dir: Path, runs: Sequence[Any], name: str) -> UnitMaps:
    """The unit maps a frontier sweep's ``runs`` choose from: the demo's own variance map, every other one made now
    (and cached in ``cache_dir``), so that a run whose map cannot be made fails before any run trains. ``name``
    prefixes the progress lines."""
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import load

    aligned = demo_dir / DEMO_ALIGNED_MODEL

    def load_aligned() -> tuple[Any, Any]:
        model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(aligned)

    maps = UnitMaps(
        config,
        load_aligned,
        lambda: load(config.model, dtype=torch.float32),
        cache_dir,
        {"variance": UnitMap.load(demo_dir / DEMO_ALIGNED_MAP)},
    )
    for run in runs:
        if run.scorer is not None and run.scorer not in maps.maps:
            print(f"[{name}] {run.scorer} unit map of the aligned model", file=sys.stderr, flush=True)
            run.unit_map(maps)
    return maps
