"""The frontier's chooser registry and its controls (issues 25 and 26): every chooser reads the map its source
records and takes the top of its ranking; random controls match its per-layer and per-kind counts, independent
draws are independent (their overlap is the hypergeometric one, not that of nested prefixes), the parameter-matched
arm freezes as many parameters for a choice as for its control, and the v2 selectors' maps are made and cached."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_chat_llama, tiny_model, tiny_tokenizer

from ssah_peft import UnitMap, UnitScores, resolve_architecture
from ssah_peft.experiments import DemoConfig
from ssah_peft.experiments.chooser_maps import UNIT_MAPS, UnitMaps, map_key, sweep_unit_maps
from ssah_peft.experiments.choosers import CHOOSERS, Chooser, chooser_named
from ssah_peft.experiments.frontier import (
    ALL_CHOOSERS,
    OTHER_CHOOSERS,
    FrontierRun,
    check_runs,
    frontier_runs,
    protection_selector,
)
from ssah_peft.experiments.frontier_tables import frontier_row, paired_differences
from ssah_peft.experiments.methods import UnitSelector, random_draw
from ssah_peft.scoring import model_fingerprint
from ssah_peft.scoring.attribution import alignment_delta_scores
from ssah_peft.unit_map import choose_units, counts_per_block, unit_widths
from ssah_peft.unit_map.attributed import one_score_map
from ssah_peft.units import unit_slices

MODEL = tiny_model("llama", num_layers=3)


def random_scores(method: str, seed: int) -> UnitScores:
    fingerprint = model_fingerprint(MODEL)
    generator = torch.Generator().manual_seed(seed)
    scores = {
        kind: tuple(torch.rand(w, generator=generator, dtype=torch.float64) for w in widths)
        for kind, widths in fingerprint["widths"].items()
    }
    return UnitScores(scores=scores, method=method, num_tokens=1, num_sequences=1, fingerprint=fingerprint)


@pytest.fixture(scope="module")
def maps() -> dict[str, UnitMap]:
    """A map of random scores for every source, keyed as a sweep keys them for the task attack."""
    config = DemoConfig.quick()
    made = {}
    for i, (name, source) in enumerate(UNIT_MAPS.items()):
        safety = random_scores(source.scorer, 2 * i)
        if source.scorer in ("variance", "wanda", "snip"):
            made[map_key(name, "task")] = UnitMap.from_scores(safety, random_scores(source.scorer, 2 * i + 1))
        else:
            made[map_key(name, "task")] = one_score_map(safety, **config.unit_fractions)
    return made


def as_set(units) -> set[tuple[int, str, int]]:
    return {
        (int(layer), kind, j) for layer, blocks in units.items() for kind, indices in blocks.items() for j in indices
    }


def test_every_chooser_reads_the_map_its_source_records_and_names_its_control(maps):
    assert ALL_CHOOSERS[:4] == ("ssah", "wanda", "snip", "random")
    assert set(ALL_CHOOSERS) == {name for chooser in CHOOSERS.values() for name in chooser.runs}
    assert "random_refusal_direction" in OTHER_CHOOSERS and "random_snip" not in OTHER_CHOOSERS
    for chooser in CHOOSERS.values():
        unit_map = maps[FrontierRun("task", "protect", chooser.name, 0.2, 0).scorer]
        assert unit_map.calibration["safety"]["method"] == UNIT_MAPS[chooser.unit_map].scorer
        chosen = chooser.selector(0.2)(unit_map)
        assert chosen == choose_units(unit_map, 0.2, "protect", rule=chooser.rule, kinds=chooser.kinds)
        assert chooser_named(chooser.control) == (chooser, True) and chooser_named(chooser.name) == (chooser, False)
    assert CHOOSERS["ssah"].control == "random" and CHOOSERS["conflict"].control == "random_conflict"
    with pytest.raises(ValueError, match="Unknown chooser 'gradient'; known: ssah, random, wanda"):
        chooser_named("gradient")
    # a map of another scorer is refused, naming both
    with pytest.raises(ValueError, match="from a refusal_direction map, got a variance map"):
        FrontierRun("task", "protect", "refusal_direction", 0.2, 0).method().units_of(maps["variance"])


def test_a_one_score_chooser_freezes_the_units_of_the_largest_scores(maps):
    unit_map = maps["alignment_delta"]
    widths = unit_widths(unit_map)
    total = sum(map(sum, widths.values()))
    ranked = sorted(
        (
            (-float(s), layer, kind, j)
            for kind in ("mlp", "attn")
            for layer, scores in enumerate(unit_map.safety_scores[kind])
            for j, s in enumerate(scores)
        ),
        key=lambda item: item[0],
    )
    wanted = math.floor(0.075 * total + 0.5)
    expected = {(layer, kind, j) for _, layer, kind, j in ranked[:wanted]}
    assert as_set(protection_selector("alignment_delta", 0.075, seed=0)(unit_map)) == expected
    assert not unit_map.utility_scores["mlp"][0].any()


def test_adding_a_selector_is_one_entry(maps):
    entry = Chooser("snip_attn", "snip", kinds=("attn",), description="SNIP's difference, attention only")
    chosen = entry.selector(0.1)(maps["snip"])
    assert {kind for _, kind, _ in as_set(chosen)} == {"attn"}
    control = entry.random_control(0.1, seed=0, draw=0)(maps["snip"])
    assert counts_per_block(control) == counts_per_block(chosen) and control != chosen
    assert entry.control == "random_snip_attn"


def test_independent_draws_match_the_counts_and_differ_across_draws_and_seeds(maps):
    unit_map = maps["snip"]
    chosen = protection_selector("snip", 0.2, seed=0)(unit_map)
    draws = {
        (draw, seed): protection_selector("random_snip", 0.2, seed, draw)(unit_map)
        for draw in range(5)
        for seed in (0, 1)
    }
    for units in draws.values():
        assert counts_per_block(units) == counts_per_block(chosen)
    assert len({json.dumps(units, sort_keys=True) for units in draws.values()}) == len(draws)
    assert protection_selector("random_snip", 0.2, 1, 3)(unit_map) == draws[(3, 1)]  # reproducible
    # the generator's key is (control, budget, draw, seed): another chooser's control of the same counts draws anew
    same_counts = CHOOSERS["snip"].selector(0.2)
    assert random_draw(same_counts, "random_snip", 0.2, 0, 0)(unit_map) == draws[(0, 0)]
    assert random_draw(same_counts, "random_wanda", 0.2, 0, 0)(unit_map) != draws[(0, 0)]


def expected_overlap(counts: dict, widths: dict) -> float:
    """The mean of |A ∩ B| for independent uniform draws of k_b of n_b units per block (hypergeometric: k_b²/n_b)."""
    return sum(k * k / widths[kind][layer] for (layer, kind), k in counts.items())


def test_two_independent_draws_overlap_as_chance_says_and_are_not_nested_prefixes(maps):
    unit_map = maps["variance"]
    widths = unit_widths(unit_map)
    counts = counts_per_block(protection_selector("ssah", 0.2, seed=0)(unit_map))
    overlaps = [
        len(
            as_set(protection_selector("random", 0.2, seed, 0)(unit_map))
            & as_set(protection_selector("random", 0.2, seed, 1)(unit_map))
        )
        for seed in range(60)
    ]
    expected = expected_overlap(counts, widths)
    sd = math.sqrt(
        sum(
            k * k / n * (n - k) / n * (n - k) / (n - 1)
            for (layer, kind), k in counts.items()
            for n in [widths[kind][layer]]
        )
    )  # hypergeometric variance per block, summed
    assert abs(sum(overlaps) / len(overlaps) - expected) < 4 * sd / math.sqrt(len(overlaps))
    # the first sweep's controls at one seed are prefixes of one permutation: the smaller budget's units nest in the
    # larger's; independent draws at two budgets do not
    small, large = (protection_selector("random", budget, seed=0)(unit_map) for budget in (0.075, 0.4))
    assert as_set(small) <= as_set(large)
    small, large = (protection_selector("random", budget, 0, 0)(unit_map) for budget in (0.075, 0.4))
    assert not as_set(small) <= as_set(large)


def frozen_parameters(units, unit_parts: str) -> int:
    """Weights frozen by protect mode (rule "any"): the slices' rows or columns times the other dimension."""
    spec = resolve_architecture(MODEL.config)
    modules = dict(MODEL.named_modules())
    total = 0
    for layer, blocks in units.items():
        for kind, indices in blocks.items():
            width = modules[f"model.layers.{layer}.{spec.blocks[kind].out_proj}"].in_features
            for relative, (axis, index) in unit_slices(
                spec, kind, torch.tensor(indices, dtype=torch.long), width, "any", unit_parts
            ).items():
                weight = modules[f"model.layers.{layer}.{relative}"].weight
                total += index.numel() * weight.shape[0 if axis == "in" else 1]
    return total


def test_the_parameter_matched_arm_freezes_as_many_parameters_for_a_choice_as_for_its_control(maps):
    unit_map = maps["variance"]
    head = {str(layer): {"mlp": [], "attn": list(range(8))} for layer in range(3)}  # one whole head per layer
    random_heads = random_draw(UnitSelector("whole heads", lambda unit_map: head), "heads", 0)(unit_map)
    assert counts_per_block(random_heads) == counts_per_block(head)
    assert frozen_parameters(random_heads, "all") > frozen_parameters(head, "all")  # scattered channels, more q/k rows
    assert frozen_parameters(random_heads, "out_proj") == frozen_parameters(head, "out_proj")
    method = FrontierRun("task", "protect_out_proj", "random_snip", 0.2, 0, draw=2).method()
    assert method.freezes_units and method.learning_rate_key == "ssah_protect"
    units = method.units_of(maps["snip"])
    assert method.peft_config(units).unit_parts == "out_proj"
    chosen = FrontierRun("task", "protect_out_proj", "snip", 0.2, 0).method().units_of(maps["snip"])
    assert frozen_parameters(units, "out_proj") == frozen_parameters(chosen, "out_proj")


def test_a_sweep_runs_every_draw_of_a_control_and_checks_the_new_choosers(maps):
    runs = frontier_runs([0.075], ["margin_grad", "random_margin_grad"], ["protect"], ["task"], [0], draws=range(5))
    controls = [run for run in runs if run.chooser == "random_margin_grad"]
    assert [run.draw for run in controls] == [0, 1, 2, 3, 4]
    assert [run.draw for run in runs if run.chooser == "margin_grad"] == [None]
    assert controls[3].name == "protect-random_margin_grad-7.5-draw3"
    assert FrontierRun("task", "protect", "conflict", 0.2, 0).scorer == "conflict_task"
    assert FrontierRun("identity_shift", "protect", "conflict", 0.2, 0).scorer == "conflict_identity_shift"
    check_runs(runs, maps)
    with pytest.raises(ValueError, match="Only a random control's run has draws; 'snip'"):
        FrontierRun("task", "protect", "snip", 0.2, 0, draw=1)
    with pytest.raises(ValueError, match="Unknown setting 'frozen'"):
        FrontierRun("task", "frozen", "snip", 0.2, 0).method()


def test_the_maps_of_a_sweep_are_made_once_and_cached(tmp_path):
    tokenizer = tiny_tokenizer()
    aligned, base = tiny_chat_llama(tokenizer), tiny_chat_llama(tokenizer)
    with torch.no_grad():
        aligned.model.layers[1].mlp.down_proj.weight[:, 3] += 1.0
    calls = []

    def load_aligned():
        calls.append("aligned")
        return aligned, tokenizer

    config = DemoConfig.quick(tmp_path, calibration_pairs=4, show_progress=False)
    maps = UnitMaps(config, load_aligned, lambda: (base, tokenizer), tmp_path / "maps")
    delta = FrontierRun("task", "protect", "random_alignment_delta", 0.2, 0, draw=1).unit_map(maps)
    assert delta is maps.get("alignment_delta", "task")
    assert FrontierRun("task", "reference", "lora", 0.0, 0).unit_map(maps) is None
    assert delta is maps.get("alignment_delta", "identity_shift") and calls == ["aligned"]
    expected = alignment_delta_scores(aligned, base).scores["mlp"][1].float()
    torch.testing.assert_close(delta.safety_scores["mlp"][1], expected)
    assert as_set(protection_selector("alignment_delta", 0.006, seed=0)(delta)) == {(1, "mlp", 3)}
    reloaded = UnitMaps(config, load_aligned, cache_dir=tmp_path / "maps").get("alignment_delta", "task")
    assert calls == ["aligned"] and torch.equal(reloaded.safety_scores["mlp"][1], delta.safety_scores["mlp"][1])
    direction = maps.get("refusal_direction", "task")
    assert direction.calibration["safety"]["method"] == "refusal_direction"
    margin = maps.get("margin_grad", "task")
    for kind in margin.kinds:  # z-scored within every block
        for scores in margin.safety_scores[kind]:
            assert abs(float(scores.mean())) < 1e-4 and float(scores.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
    conflict = maps.get("conflict", "task")
    assert conflict.calibration["safety"]["task"] == "task" and conflict.calibration["safety"]["task_records"] == 4
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "unitmap_alignment_delta.safetensors",
        "unitmap_conflict_task.safetensors",
        "unitmap_margin_grad.safetensors",
        "unitmap_refusal_direction.safetensors",
    ]
    with pytest.raises(ValueError, match="give load_base"):
        UnitMaps(config, load_aligned).get("alignment_delta", "task")


def test_a_chooser_is_paired_with_the_mean_of_its_controls_draws_at_each_seed():
    def result(asr_hits: int) -> dict:
        return {
            "metrics": {"asr": asr_hits / 36, "task_accuracy": 0.1, "overrefusal": 0.0, "perplexity": 5.0},
            "trainable_parameters": 10,
            "train_seconds": 1.0,
        }

    rows = [frontier_row(FrontierRun("task", "protect", "snip", 0.2, seed), result(10 + seed)) for seed in (0, 1)]
    rows += [
        frontier_row(FrontierRun("task", "protect", "random_snip", 0.2, seed, draw), result(20 + 2 * draw + seed))
        for seed in (0, 1)
        for draw in range(3)
    ]
    assert rows[2]["draw"] == 0 and "draw" not in rows[0]
    (comparison,) = paired_differences(rows)
    assert comparison["control"] == "random_snip" and comparison["seeds"] == 2 and comparison["seeds_lower_asr"] == 2
    # per seed: snip's hits minus the mean of the three draws' (20 + seed, 22 + seed, 24 + seed)
    assert comparison["asr_difference"] == pytest.approx(((10 - 22) / 36, 0.0))


def test_a_sweep_of_a_given_model_scores_every_map_on_it(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_chat_llama(tokenizer, intermediate_size=64)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = DemoConfig.quick(tmp_path, calibration_pairs=4, max_length=512, show_progress=False)
    runs = [
        FrontierRun("task", "protect", "random", 0.2, 0, draw=0),
        FrontierRun("task", "protect", "snip", 0.2, 0),
    ]
    maps = sweep_unit_maps(config, None, tmp_path / "maps", runs, "test", model=str(tmp_path / "model"))
    assert set(maps.maps) == {"variance", "snip"}  # made now: no demo map to reuse
    assert maps.maps["snip"].fingerprint == UnitMap.load(next((tmp_path / "maps").glob("*snip*"))).fingerprint
    with pytest.raises(ValueError, match="give load_base"):
        maps.get("alignment_delta", "task")  # a model aligned by its makers has no base in the sweep
    with pytest.raises(ValueError, match="neither was given"):
        sweep_unit_maps(config, None, tmp_path / "maps", runs, "test")
