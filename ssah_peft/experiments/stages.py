"""The stages of the demo (:mod:`.demo`): baseline, alignment, units of the aligned model, attacks with the
migration of unit types. Each returns its results and caches every piece of them in the run directory.

A module of its own because the stages are the experiment's protocol, the part a reader checks against the paper:
which model each stage starts from, which methods (:mod:`.methods`) it compares on which data (:mod:`.data`), and
what it hands to the next stage. Training, measuring and caching are in their own modules.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..analysis import (
    AblationTable,
    ProbeResult,
    ablation_table,
    plot_ablation,
    plot_migration,
    plot_probe,
    probe_reasoning_direction,
)
from ..data import load_builtin
from ..unit_map import UnitMap
from .caching import cached_artifact, cached_result
from .config import DemoConfig
from .data import alignment_records, attack_records, spread
from .finetuning import merged_model, train_method
from .measures import evaluate_model, generation_settings, unit_map_of, unit_maps_in_one_pass
from .methods import (
    FULL,
    LORA,
    SSAH_PROTECT_ALL_CU,
    SSAH_PROTECT_ALL_CU_RANDOM,
    SSAH_PROTECT_TOP_CU,
    SSAH_PROTECT_TOP_CU_RANDOM,
    SSAH_SELECT_RANDOM,
    SSAH_SELECT_RU,
    Method,
)
from .stability import StabilityTable, stability_table
from .timing import timed

ModelLoader = Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]

#: The methods of the alignment comparison (stage 2) and of the attacks (stage 4); each SSAH method is followed by
#: its random control (:data:`.methods.RANDOM_CONTROLS`).
ALIGN_METHODS: tuple[Method, ...] = (FULL, LORA, SSAH_SELECT_RU, SSAH_SELECT_RANDOM)
ATTACK_METHODS: tuple[Method, ...] = (
    FULL,
    LORA,
    SSAH_PROTECT_TOP_CU,
    SSAH_PROTECT_TOP_CU_RANDOM,
    SSAH_PROTECT_ALL_CU,
    SSAH_PROTECT_ALL_CU_RANDOM,
)


def log(message: str) -> None:
    """A progress line of the demo on stderr."""
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def loaded(config: DemoConfig, stage: str, what: str, loader: ModelLoader) -> tuple[PreTrainedModel, Any]:
    """``loader()``, its time logged as a model load of ``stage`` (:mod:`.timing`)."""
    with timed(config, stage, "model loads", what):
        return loader()


def stage_baseline(config: DemoConfig, load_base: ModelLoader) -> dict[str, Any]:
    """Stage 1: the base model's ASR, over-refusal, task accuracy and perplexity."""

    def compute() -> dict[str, Any]:
        log("stage 1/5: evaluating the base model")
        model, tokenizer = loaded(config, "1 baseline", "base model", load_base)
        return {
            "method": "base",
            "trainable_parameters": 0,
            "stored_bytes": 0,
            "train_seconds": 0.0,
            **evaluate_model(model, tokenizer, config),
        }

    return cached_result(config.run_dir / "baseline" / "result.json", compute)


def stage_align(config: DemoConfig, load_base: ModelLoader) -> dict[str, dict[str, Any]]:
    """Stage 2: align on the redundant units vs full fine-tuning vs LoRA; merge the chosen one into a new base."""
    stage_dir = config.run_dir / "align"

    def base_map() -> UnitMap:
        log(f"stage 2/5: scoring the base model for its redundant units ({config.redundant_fraction:.0%})")
        model, tokenizer = loaded(config, "2 align", "base model", load_base)
        with timed(config, "2 align", "scoring passes", "base model"):
            unit_map = unit_map_of(model, tokenizer, config, config.alignment_fractions)
        with timed(config, "2 align", "saving and figures", "unit map figure"):
            unit_map.plot(stage_dir / "unitmap_base.png")
        return unit_map

    unit_map = cached_artifact(stage_dir / "unitmap_base.safetensors", base_map, UnitMap.load)
    records = alignment_records(config)
    results = {}
    for method in ALIGN_METHODS:
        run_dir = stage_dir / method.name

        def compute(method: Method = method, run_dir: Path = run_dir) -> dict[str, Any]:
            log(f"stage 2/5: aligning with {method.name} ({config.align_steps} steps)")
            model, tokenizer = loaded(config, "2 align", "base model", load_base)
            learning_rate = config.align_learning_rates[method.learning_rate_key]
            model, info = train_method(
                model, tokenizer, records, method, config.align_steps, learning_rate, config, run_dir, unit_map
            )
            if method.name == config.aligned_method:
                with timed(config, "2 align", "saving and figures", "merged aligned model"):
                    model = merged_model(model)
                    model.save_pretrained(stage_dir / "aligned_model")
                    tokenizer.save_pretrained(stage_dir / "aligned_model")
            return {**info, **evaluate_model(model, tokenizer, config)}

        results[method.name] = cached_result(run_dir / "result.json", compute)
    return results


def load_aligned(config: DemoConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The merged aligned model written by :func:`stage_align`."""
    path = config.run_dir / "align" / "aligned_model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is missing; delete {config.run_dir / 'align' / config.aligned_method} "
            "so that stage 2 trains and merges the aligned model again"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


@dataclass
class UnitsStage:
    """What stage 3 found: the aligned model's unit map, the SCU ablation check, the refusal probes and the stability
    of the unit sets."""

    unit_map: UnitMap
    ablation: AblationTable
    probes: dict[str, ProbeResult]
    stability: StabilityTable

    def scu_check(self) -> str:
        """The paper's check: ablating the SCU must raise the ASR far more than ablating random units of that size."""
        asr = {row.name: row.asr for row in self.ablation.rows}
        control = next(name for name in asr if name.startswith("random"))
        rise, control_rise = asr["SCU"] - asr["none"], asr[control] - asr["none"]
        verdict = "passes" if rise > control_rise + 0.1 else "fails"
        return (
            f"{verdict}: ablating the SCU changes the ASR by {rise:+.3f}, ablating random units of the same size "
            f"by {control_rise:+.3f} (the check asks for at least 0.1 more)"
        )


def stage_units(config: DemoConfig, load_base: ModelLoader) -> UnitsStage:
    """Stage 3: classify the aligned model's units, check the SCU by ablation against a random control of the same
    size, probe whether harmful queries lean to refusal or compliance in the base and the aligned model, and
    measure how stable the unit sets are (calibration halves, another scorer)."""
    stage_dir = config.run_dir / "units"
    scored: dict[str, Any] = {}

    def scored_maps() -> dict[str, Any]:
        """The aligned model's map, its two calibration halves' maps and its Wanda map, from one scoring pass
        (:func:`.measures.unit_maps_in_one_pass`); computed once, for whichever of the map and the stability
        table is not cached yet."""
        if not scored:
            log("stage 3/5: scoring the aligned model (two calibration halves in one pass; variance and wanda)")
            model, tokenizer = loaded(config, "3 units", "aligned model", lambda: load_aligned(config))
            with timed(config, "3 units", "scoring passes", "aligned model: both halves, variance and wanda"):
                scored.update(unit_maps_in_one_pass(model, tokenizer, config, config.unit_fractions, rivals=("wanda",)))
        return scored

    def aligned_map() -> UnitMap:
        unit_map = scored_maps()["full"]
        with timed(config, "3 units", "saving and figures", "unit map figure"):
            unit_map.plot(stage_dir / "unitmap_aligned.png")
        return unit_map

    unit_map = cached_artifact(stage_dir / "unitmap_aligned.safetensors", aligned_map, UnitMap.load)

    def ablation() -> AblationTable:
        log("stage 3/5: ablating the SCU and a random control of the same size")
        model, tokenizer = loaded(config, "3 units", "aligned model", lambda: load_aligned(config))
        with timed(config, "3 units", "SCU ablation", "intact, SCU, random"):
            table = ablation_table(
                model,
                tokenizer,
                unit_map,
                types=("SCU",),
                limit=config.harmful_prompts,
                settings=generation_settings(config),
                seed=config.seed,
            )
        plot_ablation(table, stage_dir / "ablation.png")
        return table

    table = cached_artifact(stage_dir / "ablation.json", ablation, AblationTable.load)
    probes = {}
    for name, loader in (("base", load_base), ("aligned", lambda: load_aligned(config))):

        def probe(name: str = name, loader: ModelLoader = loader) -> ProbeResult:
            log(f"stage 3/5: probing the refusal direction of the {name} model")
            model, tokenizer = loaded(config, "3 units", f"{name} model", loader)
            prompts = [r["prompt"] for r in spread(load_builtin("harmful_eval"), config.probe_prompts)]
            with timed(config, "3 units", "refusal probes", f"{name} model"):
                result = probe_reasoning_direction(model, tokenizer, prompts, show_progress=config.show_progress)
            plot_probe(result, stage_dir / f"probe_{name}.png")
            return result

        probes[name] = cached_artifact(stage_dir / f"probe_{name}.json", probe, ProbeResult.load)

    def stability() -> StabilityTable:
        maps = scored_maps()

        def score(method: str, half: Optional[int]) -> UnitMap:
            return maps["halves"][half] if half is not None else maps[method]

        return stability_table(score, unit_map)

    stability_of_units = cached_artifact(stage_dir / "stability.json", stability, StabilityTable.load)
    return UnitsStage(unit_map, table, probes, stability_of_units)


def stage_attack(config: DemoConfig, unit_map: UnitMap) -> dict[str, dict[str, Any]]:
    """Stage 4: benign fine-tuning attacks (``config.attacks``) on the aligned model with full FT, LoRA and SSAH
    protect mode; protect runs train ``protect_epoch_factor`` times the steps. Results are keyed ``data/method``."""
    results = {}
    for data in config.attacks:
        for method in ATTACK_METHODS:
            key = f"{data}/{method.name}"
            run_dir = config.run_dir / "attack" / data / method.name
            results[key] = attack_result(
                config,
                lambda: load_aligned(config),
                data,
                method,
                unit_map,
                run_dir,
                migration=key in config.migration_runs,
            )
    return results


def attack_result(
    config: DemoConfig,
    load_aligned_model: ModelLoader,
    data: str,
    method: Method,
    unit_map: Optional[UnitMap],
    run_dir: Path,
    *,
    migration: bool = False,
) -> dict[str, Any]:
    """One attack run, cached in ``run_dir``: ``method`` (its units chosen from ``unit_map``) fine-tunes a fresh
    copy of the aligned model (``load_aligned_model``) on the attack set ``data`` at the attack learning rate of its
    key, then is evaluated; ``migration`` scores the attacked model again (:func:`migration_after`). The demo's
    stage 4 and ``benchmarks/frontier.py`` run every attack through here."""
    steps = config.attack_steps * (config.protect_epoch_factor if method.freezes_units else 1)

    def compute() -> dict[str, Any]:
        log(f"stage 4/5: attack on {data} with {method.name} ({steps} steps, seed {config.seed})")
        model, tokenizer = loaded(config, "4 attack", "aligned model", load_aligned_model)
        learning_rate = config.attack_learning_rates[method.learning_rate_key]
        records = attack_records(data, config)
        model, info = train_method(model, tokenizer, records, method, steps, learning_rate, config, run_dir, unit_map)
        result = {"data": data, **info, **evaluate_model(model, tokenizer, config)}
        if migration and unit_map is not None:
            result["migration"] = migration_after(model, tokenizer, unit_map, config, run_dir)
        return result

    return cached_result(run_dir / "result.json", compute)


def migration_after(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, before: UnitMap, config: DemoConfig, run_dir: Path
) -> str:
    """Score an attacked model like the aligned one (same data and proportions), save its unit map and the
    migration figure into ``run_dir``; returns the migration as a text table."""
    key = f"{run_dir.parent.name}/{run_dir.name}"
    log(f"stage 4/5: scoring {key} for the migration of unit types")
    with timed(config, "4 attack", "scoring passes", f"{key} (migration)"):
        after = unit_map_of(merged_model(model), tokenizer, config, config.unit_fractions)
    with timed(config, "4 attack", "saving and figures", f"{key} migration"):
        after.save(run_dir / "unitmap.safetensors")
        migration = before.migration(after)
        plot_migration(migration, run_dir / "migration.png", title=f"after {run_dir.name} on {run_dir.parent.name}")
    return migration.table()
