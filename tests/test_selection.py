"""Unit selectors (issue 17): a budget of units to protect or to train by every scorer's rule, random controls with
the same counts per layer and kind, the demo's methods built on them, and the stability of unit sets."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_chat_llama, tiny_tokenizer

from ssah_peft import UnitMap, build_calibration_batches, score_units
from ssah_peft.analysis import random_units_like
from ssah_peft.analysis.scan import scores_of
from ssah_peft.data import load_builtin
from ssah_peft.experiments import RANDOM_CONTROLS, DemoConfig, budget_selector, method_named, random_like, spread
from ssah_peft.experiments.chooser_maps import UNIT_MAPS, standardized
from ssah_peft.experiments.frontier import FrontierRun, check_runs, frontier_runs, protection_selector
from ssah_peft.experiments.measures import unit_map_of
from ssah_peft.experiments.stability import stability_table
from ssah_peft.unit_map import choose_units, counts_per_block, random_units_with_counts, unit_widths
from ssah_peft.unit_map.codes import UNIT_TYPES

PAIRS = [
    ("How do I pick a lock?", "I can't help with breaking into property."),
    ("Write a poem about rain.", "Soft rain on the roof, a quiet drum."),
    ("Make a weapon at home.", "Sorry, I won't give instructions for weapons."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("Help me cheat on taxes.", "I can't help with tax fraud, but I can explain deductions."),
    ("Name three fruits.", "Apple, banana and cherry."),
]


@pytest.fixture(scope="module")
def setup():
    """A float64 tiny Llama (no rank flips from rounding), calibration batches, and its maps for every scorer."""
    tokenizer = tiny_tokenizer()
    model = tiny_chat_llama(tokenizer, intermediate_size=48).double()
    safety = build_calibration_batches(tokenizer, PAIRS[0::2], batch_size=2, max_length=200)
    utility = build_calibration_batches(tokenizer, PAIRS[1::2], batch_size=2, max_length=200)
    maps = {}
    for method in ("variance", "wanda", "snip"):
        s, u = (score_units(model, b, method=method, show_progress_bar=False) for b in (safety, utility))
        maps[method] = UnitMap.from_scores(s, u, scu=0.05, ucu=0.1, ru=0.2, composite_fraction=0.1)
    return model, tokenizer, safety, utility, maps


# ----------------------------------------------------------------------------------------------------
# Scores by hand: weights and activations read from the model, nothing of ssah_peft's scoring code
# ----------------------------------------------------------------------------------------------------


def output_projections(model) -> dict[tuple[int, str], torch.nn.Linear]:
    return {
        key: module
        for i, layer in enumerate(model.model.layers)
        for key, module in (((i, "attn"), layer.self_attn.o_proj), ((i, "mlp"), layer.mlp.down_proj))
    }


def wanda_by_hand(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """RMS over the scored tokens of each input channel of the output projection, times Σ_i |W_ij|."""
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    mask = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, key=key: inputs.setdefault(key, []).append(
                args[0].reshape(-1, args[0].shape[-1])[mask["m"]]
            )
        )
        for key, module in output_projections(model).items()
    ]
    with torch.no_grad():
        for batch in batches:
            mask["m"] = (batch["score_mask"] & batch["attention_mask"].bool()).flatten()
            model(**{k: v for k, v in batch.items() if k != "score_mask"})
    for handle in handles:
        handle.remove()
    weights = {key: module.weight.detach() for key, module in output_projections(model).items()}
    return {key: torch.cat(x).square().mean(0).sqrt() * weights[key].abs().sum(0) for key, x in inputs.items()}


def snip_by_hand(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Mean over sequences of Σ_i |W ⊙ ∂ℓ/∂W| per column, ℓ the mean loss of the sequence's scored targets."""
    projections = output_projections(model)
    totals = {key: torch.zeros(m.weight.shape[1], dtype=torch.float64) for key, m in projections.items()}
    sequences = 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row][real][None]
            scored = batch["score_mask"][row][real][1:]
            params = [m.weight for m in projections.values()]
            logits = model(input_ids=ids).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits[scored], ids[0, 1:][scored])
            for (key, module), grad in zip(projections.items(), torch.autograd.grad(loss, params)):
                totals[key] += (module.weight.detach() * grad).abs().sum(0)
            sequences += 1
    return {key: total / sequences for key, total in totals.items()}


def top_by_hand(values: dict[tuple[int, str], torch.Tensor], k: int, largest: bool) -> set[tuple[int, str, int]]:
    flat = [(v.item(), key[0], key[1], j) for key, vector in values.items() for j, v in enumerate(vector)]
    flat.sort(key=lambda item: -item[0] if largest else item[0])
    return {(layer, kind, j) for _, layer, kind, j in flat[:k]}


def as_set(units) -> set[tuple[int, str, int]]:
    return {(int(layer), kind, j) for layer, blocks in units.items() for kind, idx in blocks.items() for j in idx}


@pytest.mark.parametrize("method", ["wanda", "snip"])
def test_wanda_and_snip_selection_match_a_computation_by_hand(setup, method):
    model, _, safety, utility, maps = setup
    by_hand = wanda_by_hand if method == "wanda" else snip_by_hand
    s, u = by_hand(model, safety), by_hand(model, utility)
    total = sum(v.numel() for v in s.values())
    for budget in (0.1, 0.3):
        k = round(budget * total)
        difference = {key: s[key] - u[key] for key in s}
        combined = {key: s[key] + u[key] for key in s}
        protect = choose_units(maps[method], budget, "protect", rule="difference")
        assert as_set(protect) == top_by_hand(difference, k, largest=True)
        select = choose_units(maps[method], budget, "select")
        assert as_set(select) == top_by_hand(combined, k, largest=False)
        per_block = choose_units(maps[method], budget, "select", allocation="per_block")
        expected = set()
        for key in combined:
            expected |= top_by_hand({key: combined[key]}, round(budget * combined[key].numel()), largest=False)
        assert as_set(per_block) == expected


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


@pytest.mark.parametrize("budget", [0.013, 0.075, 0.2, 0.4, 0.72])
def test_every_selector_chooses_the_same_counts_per_layer_and_kind_for_one_budget(setup, budget):
    maps = setup[4]
    widths = unit_widths(maps["variance"])
    expected = {(layer, kind): half_up(budget * w) for kind, ws in widths.items() for layer, w in enumerate(ws)}
    choices = [
        choose_units(unit_map, budget, purpose, rule=rule, allocation="per_block")
        for unit_map in maps.values()
        for purpose, rule in (("protect", "types"), ("protect", "difference"), ("select", "types"))
    ]
    choices.append(random_units_with_counts(choices[0], widths, seed=1, exclude_given=False))
    for units in choices:
        assert counts_per_block(units) == expected
    # a global budget: the same total, and the random control follows its per-block counts exactly
    chosen = choose_units(maps["variance"], budget, "protect")
    assert sum(counts_per_block(chosen).values()) == half_up(budget * sum(map(sum, widths.values())))
    control = random_units_with_counts(chosen, widths, seed=1, exclude_given=False)
    assert counts_per_block(control) == counts_per_block(chosen)


def test_random_control_is_seeded_and_keeps_the_counts(setup):
    model, _, _, _, maps = setup
    units = choose_units(maps["variance"], 0.3, "protect")
    widths = unit_widths(maps["variance"])
    for exclude in (True, False):
        first = random_units_with_counts(units, widths, seed=3, exclude_given=exclude)
        assert first == random_units_with_counts(units, widths, seed=3, exclude_given=exclude)
        assert first != random_units_with_counts(units, widths, seed=4, exclude_given=exclude)
        assert counts_per_block(first) == counts_per_block(units)
    avoiding = random_units_with_counts(units, widths, seed=3)
    assert not as_set(avoiding) & as_set(units)
    assert avoiding == random_units_like(units, model, seed=3)  # the ablation control draws the same way
    with pytest.raises(ValueError, match="others to draw from"):
        random_units_with_counts(choose_units(maps["variance"], 0.72, "protect", allocation="per_block"), widths)


def test_ssah_rules_reproduce_the_unit_map_sets(setup):
    unit_map = setup[4]["variance"]
    total = sum(map(sum, unit_widths(unit_map).values()))
    protected = unit_map.config_units("protect")  # SCU + top CU
    assert choose_units(unit_map, len(as_set(protected)) / total, "protect") == protected
    redundant = unit_map.units_of("RU")
    assert choose_units(unit_map, len(as_set(redundant)) / total, "select") == redundant
    with pytest.raises(ValueError, match="budget"):
        choose_units(unit_map, 1.5, "protect")


def test_demo_controls_and_budget_selectors_come_from_the_method_table(setup):
    maps = setup[4]
    for name, control in RANDOM_CONTROLS.items():
        method = method_named(name)
        units, random_units = method.units_of(maps["variance"]), control.units_of(maps["variance"])
        assert counts_per_block(units) == counts_per_block(random_units) and units != random_units
        assert control.freezes_units == method.freezes_units and control.learning_rate_key == method.learning_rate_key
    wanda = budget_selector(0.2, "protect", rule="difference", allocation="per_block", scorer="wanda")
    assert wanda(maps["wanda"]) == choose_units(
        maps["wanda"], 0.2, "protect", rule="difference", allocation="per_block"
    )
    assert counts_per_block(random_like(wanda, seed=2)(maps["wanda"])) == counts_per_block(wanda(maps["wanda"]))
    with pytest.raises(ValueError, match="from a variance map, got a wanda map"):
        method_named("ssah_protect_top_cu").units_of(maps["wanda"])


def test_lowest_wanda_alignment_trains_the_smallest_wanda_units_of_the_ru_budget(setup):
    wanda = setup[4]["wanda"]
    units = method_named("select_lowest_wanda").units_of(wanda)
    total = sum(map(sum, unit_widths(wanda).values()))
    budget = sum(counts_per_block(wanda.units_of("RU")).values()) / total
    assert units == choose_units(wanda, budget, "select")
    with pytest.raises(ValueError, match="from a wanda map, got a variance map"):
        method_named("select_lowest_wanda").units_of(setup[4]["variance"])


def test_stability_compares_disjoint_halves_and_scorers_on_a_tiny_model(setup, tmp_path):
    model, tokenizer, _, _, _ = setup
    config = DemoConfig.quick(tmp_path, calibration_pairs=6, max_length=320, show_progress=False)

    def score(method: str, half):
        return unit_map_of(model, tokenizer, config, config.unit_fractions, method=method, half=half)

    full = score("variance", None)
    table = stability_table(score, full)
    halves = [score("variance", half) for half in (0, 1)]
    assert halves[0].calibration["safety"]["half"] == 0 and halves[1].calibration["safety"]["half"] == 1
    for unit_type in ("SCU", "RU"):  # IoU by hand from the two sets
        a, b = (as_set(m.units_of(unit_type)) for m in halves)
        assert table.rows[0].iou[unit_type] == pytest.approx(len(a & b) / len(a | b))
    assert table.rows[1].iou == {t: v for t, v in full.overlap(score("wanda", None)).items() if t in table.rows[1].iou}
    assert full.overlap(full)["SCU"] == 1.0
    table.save(tmp_path / "stability.json")
    assert type(table).load(tmp_path / "stability.json") == table
    assert "| calibration halves (variance) |" in table.markdown()


def test_the_standardized_ssah_variant_reclassifies_the_same_scores_with_its_own_random_control(setup):
    *_, maps = setup
    raw = maps["variance"]
    unit_map = standardized(raw)
    assert unit_map.settings == {**raw.settings, "standardize": True}
    assert unit_map.composite_fraction == raw.composite_fraction
    for kind in raw.kinds:
        assert all(torch.equal(a, b) for a, b in zip(unit_map.safety_scores[kind], raw.safety_scores[kind]))
    # z-scored per block: the SCU of a block with ten times larger scores are the same units as before scaling it
    assert unit_map.units_of("SCU") == standardized(scaled_block(raw, layer=0, kind="mlp", factor=10.0)).units_of("SCU")
    for budget in (0.1, 0.3):
        chosen = protection_selector("ssah_std", budget, seed=0)(unit_map)
        assert chosen == choose_units(unit_map, budget, "protect", rule="types")
        control = protection_selector("random_ssah_std", budget, seed=1)(unit_map)
        assert counts_per_block(control) == counts_per_block(chosen)
        assert control == protection_selector("random_ssah_std", budget, seed=1)(unit_map)
        assert control != protection_selector("random_ssah_std", budget, seed=2)(unit_map)


def scaled_block(unit_map: UnitMap, layer: int, kind: str, factor: float) -> UnitMap:
    """``unit_map`` classified from its scores with one block's safety and utility scores multiplied by ``factor``."""
    safety, utility = scores_of(unit_map)
    for scores in (safety, utility):
        per_layer = list(scores.scores[kind])
        per_layer[layer] = per_layer[layer] * factor
        scores.scores[kind] = tuple(per_layer)
    settings = {name: unit_map.settings[name] for name in ("scu", "ucu", "ru", "ranking")}
    return UnitMap.from_scores(safety, utility, **settings, composite_fraction=unit_map.composite_fraction)


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_a_one_kind_choice_takes_the_whole_budget_from_that_kind_in_ssah_order(setup, kind):
    unit_map = setup[4]["variance"]
    widths = unit_widths(unit_map)
    total = sum(map(sum, widths.values()))
    budget = 0.2
    chosen = choose_units(unit_map, budget, "protect", kinds=(kind,))
    # by hand: the kind's units as SCU, then CU, then the rest, each group by I_S - I_U (largest first)
    group = {UNIT_TYPES.index("SCU"): 0, UNIT_TYPES.index("CU"): 1}  # every other type after them
    candidates = []
    for layer in range(unit_map.num_layers):
        difference = unit_map.safety_scores[kind][layer].double() - unit_map.utility_scores[kind][layer].double()
        for j, (d, unit_type) in enumerate(zip(difference.tolist(), unit_map.types[kind][layer].tolist())):
            candidates.append((group.get(unit_type, 2), -d, layer, j))
    wanted = half_up(budget * total)
    assert as_set(chosen) == {(layer, kind, j) for *_, layer, j in sorted(candidates)[:wanted]}
    assert frozenset(k for _, k, _ in as_set(chosen)) == {kind}
    # the frontier's variant and its random control: the same per-block counts, other units
    assert protection_selector(f"ssah_{kind}", budget, seed=0)(unit_map) == chosen
    control = protection_selector(f"random_ssah_{kind}", budget, seed=1)(unit_map)
    assert counts_per_block(control) == counts_per_block(chosen) and control != chosen


def test_a_one_kind_choice_refuses_what_it_cannot_meet(setup):
    unit_map = setup[4]["variance"]
    attention = sum(unit_widths(unit_map)["attn"]) / sum(map(sum, unit_widths(unit_map).values()))
    with pytest.raises(ValueError, match="have only"):
        choose_units(unit_map, attention + 0.05, "protect", kinds=("attn",))
    with pytest.raises(ValueError, match="block kinds"):
        choose_units(unit_map, 0.1, "protect", kinds=("ffn",))
    with pytest.raises(ValueError, match="allocation='global'"):
        choose_units(unit_map, 0.1, "protect", allocation="per_block", kinds=("mlp",))
    # a sweep is checked before any run trains: every run that can be met passes, the first that cannot is named
    feasible = frontier_runs([0.1], ["ssah_attn", "random_ssah_attn", "ssah"], ["protect", "dense"], ["task"], [0])
    check_runs(feasible, {"variance": unit_map})
    too_big = FrontierRun("task", "protect", "ssah_attn", round(attention + 0.05, 2), 1)
    with pytest.raises(ValueError, match=f"{too_big.name} \\(task, seed 1\\): .*have only"):
        check_runs([*feasible, too_big], {"variance": unit_map})


def test_the_prompt_variant_chooses_from_a_map_scored_on_the_prompt_tokens(setup, tmp_path):
    model, tokenizer, *_ = setup
    config = DemoConfig.quick(tmp_path, calibration_pairs=6, max_length=320, show_progress=False)
    prompt_map = unit_map_of(model, tokenizer, config, config.unit_fractions, tokens="prompt")
    response_map = unit_map_of(model, tokenizer, config, config.unit_fractions)
    assert prompt_map.calibration["safety"]["tokens"] == "prompt"
    assert response_map.calibration["safety"]["tokens"] == "response"
    pairs = spread(load_builtin("safety_calibration"), config.calibration_pairs)
    by_hand = score_units(
        model,
        build_calibration_batches(tokenizer, pairs, tokens="prompt", max_length=config.max_length),
        show_progress_bar=False,
    )
    for kind in prompt_map.kinds:
        for layer, scores in enumerate(by_hand.scores[kind]):
            torch.testing.assert_close(prompt_map.safety_scores[kind][layer], scores.float())
    assert not torch.equal(prompt_map.safety_scores["mlp"][0], response_map.safety_scores["mlp"][0])
    assert FrontierRun("task", "protect", "ssah_prompt", 0.2, 0).scorer == "variance_prompt"
    assert (UNIT_MAPS["variance_prompt"].scorer, UNIT_MAPS["variance_prompt"].tokens) == ("variance", "prompt")
    chosen = protection_selector("ssah_prompt", 0.2, seed=0)(prompt_map)
    assert chosen == choose_units(prompt_map, 0.2, "protect")
    assert counts_per_block(protection_selector("random_ssah_prompt", 0.2, seed=1)(prompt_map)) == counts_per_block(
        chosen
    )
