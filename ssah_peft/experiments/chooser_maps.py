"""The unit maps the frontier's choosers read (:mod:`.choosers`), each defined once: which scorer, on which data,
and how the map is made from the demo's aligned model.

A :class:`UnitMapSource` names a map and the scorer its calibration records (what a chooser's
:class:`~.methods.UnitSelector` checks the map against), and makes the map; :data:`UNIT_MAPS` holds them by name.
Maps of two scores (variance, Wanda, SNIP) are classified from safety and utility scores as the demo's are; the
attribution scores give one score per unit, made into maps by :mod:`ssah_peft.unit_map.attributed` as
``ssah-peft finetune`` makes them. ``conflict`` is computed from the fine-tuning data, so it has a
map per attack (:attr:`UnitMapSource.per_attack`).

:class:`UnitMaps` makes the maps a sweep needs, each once, caching every scored map as a unit-map file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..analysis.scan import reclassified
from ..scoring import TokenSelection
from ..scoring.attribution import alignment_delta_scores
from ..unit_map import UnitMap
from ..unit_map.attributed import conflict_map, margin_grad_map, one_score_map, refusal_direction_map
from .caching import cached_artifact
from .config import DemoConfig
from .data import attack_records, spread
from .measures import demo_calibration_set, unit_map_of
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


def _fractions(config: DemoConfig) -> dict[str, Any]:
    """How the demo classifies a map of one score (:func:`~ssah_peft.unit_map.attributed.one_score_map`)."""
    return {**config.unit_fractions, "composite_fraction": config.top_composite_fraction}


def _alignment_delta(maps: UnitMaps, attack: str) -> UnitMap:
    scores = alignment_delta_scores(maps.load_aligned()[0], maps.base()[0], metadata={"base": maps.config.model})
    return one_score_map(scores, **_fractions(maps.config))


def _on_calibration_sets(make: Callable[..., UnitMap], other: str) -> Callable[[UnitMaps, str], UnitMap]:
    """The recipe of a map of one attribution score ``make`` (:data:`~ssah_peft.unit_map.attributed.ATTRIBUTION_MAPS`)
    of the aligned model on the harmful and the utility calibration prompts, the latter recorded as ``other``."""

    def derive(maps: UnitMaps, attack: str) -> UnitMap:
        return make(
            *maps.load_aligned(),
            demo_calibration_set("safety_calibration", maps.config).pairs,
            demo_calibration_set("utility_calibration", maps.config).pairs,
            show_progress=maps.config.show_progress,
            metadata={"harmful": "safety_calibration", other: "utility_calibration"},
            classification=_fractions(maps.config),
        )

    return derive


def _conflict(maps: UnitMaps, attack: str) -> UnitMap:
    """From a sample of the attack's own training records (as many as the calibration pairs) and the harmful
    calibration prompts."""
    sample = spread(attack_records(attack, maps.config), maps.config.calibration_pairs)
    return conflict_map(
        *maps.load_aligned(),
        demo_calibration_set("safety_calibration", maps.config).pairs,
        sample,
        max_length=maps.config.max_length,
        show_progress=maps.config.show_progress,
        metadata={"task": attack, "task_records": len(sample), "harmful": "safety_calibration"},
        classification=_fractions(maps.config),
    )


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
    UnitMapSource(
        "refusal_direction", "refusal_direction", derive=_on_calibration_sets(refusal_direction_map, "harmless")
    ),
    UnitMapSource("alignment_delta", "alignment_delta", derive=_alignment_delta),
    UnitMapSource("margin_grad", "margin_grad", derive=_on_calibration_sets(margin_grad_map, "utility")),
    UnitMapSource("conflict", "conflict", derive=_conflict, per_attack=True),
)


#: Where a demo run keeps what a frontier sweep attacks: the merged aligned model and its variance unit map.
DEMO_ALIGNED_MODEL = Path("align") / "aligned_model"
DEMO_ALIGNED_MAP = Path("units") / "unitmap_aligned.safetensors"


def missing_demo_outputs(demo_dir: Path) -> list[Path]:
    """The files of a demo run a frontier sweep needs that ``demo_dir`` lacks (``make demo`` stages 1-3 make them)."""
    needed = (demo_dir / DEMO_ALIGNED_MODEL / "config.json", demo_dir / DEMO_ALIGNED_MAP)
    return [path for path in needed if not path.is_file()]


def sweep_unit_maps(
    config: DemoConfig,
    demo_dir: Optional[Path],
    cache_dir: Path,
    runs: Sequence[Any],
    name: str,
    model: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
) -> UnitMaps:
    """The unit maps a frontier sweep's ``runs`` choose from, every one made now (and cached in ``cache_dir``), so
    that a run whose map cannot be made fails before any run trains. ``name`` prefixes the progress lines.

    The model attacked is the demo's aligned model in ``demo_dir`` (its own variance map reused), or, given
    ``model``, a model aligned by its makers (:func:`ssah_peft.models.load`: an embedded name, a hub id or a folder,
    in ``dtype``), every map scored on it; it has no base model, so ``alignment_delta`` is not available for it.
    """
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import load

    if model is not None:
        maps = UnitMaps(config, lambda: load(model, dtype=dtype), None, cache_dir)
    else:
        if demo_dir is None:
            raise ValueError("a sweep attacks the demo's aligned model (demo_dir) or a given model; neither was given")
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
            print(f"[{name}] {run.scorer} unit map of the attacked model", file=sys.stderr, flush=True)
            run.unit_map(maps)
    return maps
