"""The protection frontier's bookkeeping (issue 17): which runs a sweep makes, the complement a dense run trains, and
the tables' pooled Wilson intervals and paired differences, checked against computations by hand."""

from __future__ import annotations

import csv
import statistics

import pytest

from ssah_peft.evaluate import wilson_interval
from ssah_peft.experiments.frontier import BUDGETS, DEFAULT_CHOOSERS, FrontierRun, frontier_runs, protection_selector
from ssah_peft.experiments.frontier_figure import frontier_points, plot_frontier
from ssah_peft.experiments.frontier_tables import (
    frontier_markdown,
    frontier_row,
    paired_differences,
    pooled,
    write_rows,
)
from ssah_peft.unit_map import complement_units

WIDTHS = {"mlp": [6, 6], "attn": [4, 4]}


def test_complement_holds_every_other_unit_of_every_block():
    units = {0: {"mlp": [1, 4]}, "1": {"attn": [0, 1, 2, 3]}}
    complement = complement_units(units, WIDTHS)
    assert complement == {
        "0": {"mlp": [0, 2, 3, 5], "attn": [0, 1, 2, 3]},
        "1": {"mlp": [0, 1, 2, 3, 4, 5], "attn": []},
    }
    assert complement_units(complement, WIDTHS)["0"]["mlp"] == [1, 4]
    with pytest.raises(ValueError, match="outside width 4"):
        complement_units({0: {"attn": [4]}}, WIDTHS)
    with pytest.raises(ValueError, match="layer 2"):
        complement_units({2: {"mlp": [0]}}, WIDTHS)


def test_a_sweep_has_whole_seeds_first_and_dense_runs_only_for_ssah_and_random():
    runs = frontier_runs(seeds=(0, 1, 2))
    per_seed_and_attack = 3 + len(BUDGETS) * len(DEFAULT_CHOOSERS) + len(BUDGETS) * 2
    assert len(runs) == 3 * 2 * per_seed_and_attack
    assert [run.seed for run in runs] == sorted(run.seed for run in runs)
    assert {run.chooser for run in runs if run.setting == "dense"} == {"ssah", "random"}
    assert len({(run.attack, run.seed, run.name) for run in runs}) == len(runs)  # one directory per run
    assert FrontierRun("task", "protect", "ssah", 0.075, 0).name == "protect-ssah-7.5"
    dense = FrontierRun("task", "dense", "random", 0.2, 2).method()
    assert not dense.freezes_units and dense.learning_rate_key == "full" and dense.units.name.startswith("all but")
    assert FrontierRun("task", "reference", "lora", 0.0, 0).method().name == "lora"
    assert FrontierRun("task", "reference", "lora", 0.0, 0).scorer is None
    everything = FrontierRun("task", "reference", "dense", 0.0, 0)
    assert everything.scorer == "variance" and everything.method().units.name == "all but no units"
    with pytest.raises(ValueError, match="Unknown chooser"):
        protection_selector("gradient", 0.2, 0)
    assert protection_selector("wanda", 0.2, 0).scorer == protection_selector("random_wanda", 0.2, 1).scorer == "wanda"


def result(asr_hits: int, task_hits: int) -> dict:
    return {
        "metrics": {"asr": asr_hits / 36, "task_accuracy": task_hits / 36, "overrefusal": 2 / 18, "perplexity": 5.0},
        "safety": {"harmful": {"attack_successes": asr_hits, "n": 36}, "overrefusal": {"refusals": 2, "n": 18}},
        "utility": {"task": {"correct": task_hits, "n": 36}},
        "trainable_parameters": 10,
        "train_seconds": 1.0,
        "eval_seconds": 2.0,
    }


@pytest.fixture
def rows():
    hits = {"ssah": (9, 12, 20), "random": (15, 14, 21)}  # ASR hits per seed
    return [
        frontier_row(FrontierRun("task", "protect", chooser, 0.2, seed), result(asr, 4 + seed))
        for chooser, per_seed in hits.items()
        for seed, asr in enumerate(per_seed)
    ]


def test_rows_pool_seeds_for_wilson_intervals_and_pair_them_with_random(rows, tmp_path):
    first = rows[0]
    assert (first["asr_hits"], first["asr_n"]) == (9, 36)
    assert (first["asr_low"], first["asr_high"]) == wilson_interval(9, 36)
    assert pooled(rows[:3], "asr") == (9 + 12 + 20, 108)
    (comparison,) = paired_differences(rows)
    differences = [(9 - 15) / 36, (12 - 14) / 36, (20 - 21) / 36]
    assert comparison["chooser"] == "ssah" and comparison["seeds"] == 3 and comparison["seeds_lower_asr"] == 3
    assert comparison["asr_difference"][0] == pytest.approx(statistics.mean(differences))
    assert comparison["asr_difference"][1] == pytest.approx(statistics.stdev(differences))
    assert comparison["task_difference"] == pytest.approx((0.0, 0.0))
    text = "\n".join(frontier_markdown(rows))
    low, high = wilson_interval(41, 108)
    assert f"0.380 [{low:.3f}, {high:.3f}]" in text  # 41/108 pooled over the seeds
    assert "| task | protect | ssah | random | 20.0% | 3 | -0.083 ± " in text
    path = tmp_path / "results.csv"
    write_rows(rows, path)
    with path.open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == 6 and read[0]["chooser"] == "ssah" and int(read[0]["asr_hits"]) == 9


def test_a_rival_is_paired_with_the_random_control_of_its_own_counts_where_there_is_one(rows):
    rival = [
        frontier_row(FrontierRun("task", "protect", chooser, 0.2, seed), result(hits, 4))
        for chooser, per_seed in (("snip", (5, 6)), ("random_snip", (8, 12)))
        for seed, hits in enumerate(per_seed)
    ]
    by_chooser = {c["chooser"]: c for c in paired_differences(rows + rival)}
    assert by_chooser["ssah"]["control"] == "random" and by_chooser["snip"]["control"] == "random_snip"
    assert by_chooser["snip"]["asr_difference"][0] == pytest.approx(((5 - 8) + (6 - 12)) / 2 / 36)
    assert by_chooser["snip"]["seeds"] == 2 and "random_snip" not in by_chooser


def test_points_average_the_seeds_and_the_figure_is_drawn(rows, tmp_path):
    points = {point.group: point for point in frontier_points(rows)}
    ssah = points["protect: ssah"]
    values = [9 / 36, 12 / 36, 20 / 36]
    assert ssah.asr == pytest.approx(statistics.mean(values)) and ssah.label == "20%"
    sd = statistics.stdev(values)
    assert ssah.asr_range == pytest.approx((ssah.asr - sd, ssah.asr + sd))
    single = frontier_points(rows[:1])[0]  # one seed: its Wilson interval
    assert single.asr_range == wilson_interval(9, 36)
    path = plot_frontier(list(points.values()), tmp_path / "frontier.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
