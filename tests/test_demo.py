"""The demo pipeline end to end on a tiny random Llama and a character tokenizer: stages, caching, report."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from helpers import tiny_chat_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssah_peft import UnitMap
from ssah_peft.evaluate import format_rate
from ssah_peft.experiments import (
    ALIGN_METHODS,
    ATTACK_METHODS,
    ATTACK_SETS,
    RANDOM_CONTROLS,
    DemoConfig,
    run_demo,
    spread,
    utility_split,
)
from ssah_peft.experiments.frontier import FrontierRun
from ssah_peft.experiments.report import frontier_points_of
from ssah_peft.experiments.stages import attack_result
from ssah_peft.unit_map import unit_widths


def tiny_loader(calls: list):
    def load():
        calls.append(1)
        tokenizer = tiny_tokenizer()
        return tiny_chat_llama(tokenizer, intermediate_size=64), tokenizer

    return load


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    config = DemoConfig.quick(
        tmp_path_factory.mktemp("demo"),
        calibration_pairs=4,
        align_safety_examples=4,
        align_utility_examples=4,
        attack_task_examples=4,
        max_length=320,
        batch_size=2,
        align_steps=2,
        attack_steps=1,
        protect_epoch_factor=2,
        harmful_prompts=3,
        overrefusal_prompts=2,
        task_prompts=2,
        perplexity_texts=2,
        max_new_tokens=4,
        attacks=list(ATTACK_SETS),
        show_progress=False,
    )
    calls: list = []
    report = run_demo(config, load_base=tiny_loader(calls), command="pytest demo")
    return config, report, calls


def test_every_stage_writes_its_outputs(demo_run):
    config, report, _ = demo_run
    run = config.run_dir
    assert (run / "baseline" / "result.json").is_file()
    assert (run / "align" / "unitmap_base.safetensors").is_file() and (run / "align" / "unitmap_base.png").is_file()
    assert (run / "align" / "aligned_model" / "config.json").is_file()
    for name in ("unitmap_aligned.png", "ablation.json", "ablation.png", "probe_base.png", "probe_aligned.json"):
        assert (run / "units" / name).is_file()
    ablation = json.loads((run / "units" / "ablation.json").read_text())
    assert [row["name"] for row in ablation["rows"]][:2] == ["none", "SCU"]
    assert ablation["rows"][1]["num_units"] == ablation["rows"][2]["num_units"] > 0  # the random control's size
    for method in ("lora", "ssah_select"):
        assert (run / "align" / method / "adapter" / "adapter_model.safetensors").is_file()
    assert config.attacks == list(ATTACK_SETS)  # both attack sets go through the pipeline
    for data in config.attacks:
        for method in ATTACK_METHODS:
            result = json.loads((run / "attack" / data / method.name / "result.json").read_text())
            assert 0.0 <= result["metrics"]["asr"] <= 1.0 and result["trainable_parameters"] > 0
            assert (run / "attack" / data / method.name / "generations.jsonl").read_text().count("\n") == 3 + 2 + 2
            protect = method.freezes_units
            assert result["steps"] == config.attack_steps * (config.protect_epoch_factor if protect else 1)
    for key in config.migration_runs:
        result = json.loads((run / "attack" / key / "result.json").read_text())
        assert (run / "attack" / key / "migration.png").stat().st_size > 0
        before = UnitMap.load(run / "units" / "unitmap_aligned.safetensors")
        after = UnitMap.load(run / "attack" / key / "unitmap.safetensors")
        assert result["migration"] == before.migration(after).table()
    assert report == run / "report.md"


def test_sparse_methods_train_fewer_parameters_than_full_finetuning(demo_run):
    config, _, _ = demo_run
    align = {m.name: json.loads((config.run_dir / "align" / m.name / "result.json").read_text()) for m in ALIGN_METHODS}
    assert align["ssah_select"]["trainable_parameters"] < align["full"]["trainable_parameters"]
    for method in ATTACK_METHODS[1:]:
        result = json.loads((config.run_dir / "attack" / "task" / method.name / "result.json").read_text())
        assert 0 < result["trainable_parameters"] < align["full"]["trainable_parameters"]


def test_report_table_has_every_run(demo_run):
    config, report, _ = demo_run
    text = report.read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| stage |")) + 2
    rows = lines[start : next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))]
    assert len(rows) == 1 + len(ALIGN_METHODS) + len(config.attacks) * len(ATTACK_METHODS)
    for method in (*ALIGN_METHODS, *ATTACK_METHODS):
        assert any(f"| {method.name} |" in row for row in rows)
    assert "`pytest demo`" in text and "unitmap_aligned.png" in text
    assert "SCU ablation check" in text and ("passes:" in text or "fails:" in text)
    assert "## Attribute migration" in text and "attack/task/full/migration.png" in text


def test_every_ssah_run_has_a_random_control_of_the_same_counts_per_layer_and_kind(demo_run):
    config, report, _ = demo_run
    runs = [config.run_dir / "align"] + [config.run_dir / "attack" / data for data in config.attacks]
    for run in runs:
        for name, control in RANDOM_CONTROLS.items():
            if not (run / name).is_dir():
                continue
            method, random = (json.loads((run / n / "result.json").read_text()) for n in (name, control.name))
            assert random["method"] == control.name and random["steps"] == method["steps"]
            assert random["unit_counts"] == method["unit_counts"] and sum(
                n for blocks in method["unit_counts"].values() for n in blocks.values()
            )
    assert (config.run_dir / "align" / "ssah_select_random").is_dir()
    assert all((config.run_dir / "attack" / d / "ssah_protect_all_cu_random").is_dir() for d in config.attacks)
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    for control in RANDOM_CONTROLS.values():
        assert any(f"| {control.name} |" in row for row in rows)


def test_report_shows_every_rate_with_its_wilson_interval(demo_run):
    config, report, _ = demo_run
    text = report.read_text()
    baseline = json.loads((config.run_dir / "baseline" / "result.json").read_text())
    harmful = baseline["safety"]["harmful"]
    row = next(line for line in text.splitlines() if line.startswith("| 1 baseline |"))
    assert format_rate(harmful["attack_successes"], harmful["n"]) in row
    assert "Wilson" in text
    for line in text.splitlines():
        if line.startswith(("| 1 ", "| 2 ", "| 4 ", "| none |", "| SCU |", "| random (")):  # runs, ablation rows
            assert line.count(" [") == 3, line  # ASR, over-refusal, task accuracy
    results = json.loads((config.run_dir / "results.json").read_text())
    assert {"baseline", "align", "attack", "scu_check", "ablation", "probes"} <= results.keys()  # the old keys
    low, high = results["intervals"]["baseline"]["asr"]
    assert low <= harmful["asr"] <= high


def test_report_has_the_stability_table_of_halves_and_scorers(demo_run):
    config, report, _ = demo_run
    text = report.read_text()
    assert "## Stability of the unit sets" in text and "| maps compared | IoU SCU | IoU RU |" in text
    stability = json.loads((config.run_dir / "units" / "stability.json").read_text())
    assert [row["comparison"] for row in stability["rows"]] == [
        "calibration halves (variance)",
        "variance vs wanda (all calibration data)",
    ]
    for row in stability["rows"]:
        assert all(0.0 <= value <= 1.0 for value in row["iou"].values()) and f"| {row['comparison']} |" in text


def test_rerun_resumes_from_cache_without_loading_a_model(demo_run):
    config, report, calls = demo_run
    before = {p: p.stat().st_mtime_ns for p in config.run_dir.rglob("result.json")}
    loads_before = len(calls)
    run_demo(config, load_base=tiny_loader(calls), command="pytest demo")
    assert len(calls) == loads_before
    assert {p: p.stat().st_mtime_ns for p in config.run_dir.rglob("result.json")} == before


def test_a_resumed_run_reproduces_the_uninterrupted_one(demo_run, tmp_path):
    """A run interrupted before an attack and resumed must train the same adapter: every run seeds its own
    adapter init and data order instead of inheriting the random state left by the stages before it."""
    config, _, _ = demo_run
    resumed = replace(config, run_dir=tmp_path / "run")
    shutil.copytree(config.run_dir, resumed.run_dir)
    for key in ("task/lora", "task/ssah_protect_top_cu"):
        shutil.rmtree(resumed.run_dir / "attack" / key)
    run_demo(resumed, load_base=tiny_loader([]), command="pytest demo")
    for key in ("task/lora", "task/ssah_protect_top_cu"):
        first = load_file(config.run_dir / "attack" / key / "adapter" / "adapter_model.safetensors")
        again = load_file(resumed.run_dir / "attack" / key / "adapter" / "adapter_model.safetensors")
        assert first.keys() == again.keys()
        for name in first:
            assert torch.equal(first[name], again[name]), (key, name)
        results = [json.loads((run.run_dir / "attack" / key / "result.json").read_text()) for run in (config, resumed)]
        assert results[0]["metrics"] == results[1]["metrics"]


def test_a_run_dir_resumes_with_fewer_attacks_and_reports_only_those(demo_run, tmp_path):
    config, _, calls = demo_run
    fewer = replace(config, run_dir=tmp_path / "run", attacks=["task"])
    shutil.copytree(config.run_dir, fewer.run_dir)
    loads_before = len(calls)
    text = run_demo(fewer, load_base=tiny_loader(calls)).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 4 attack |")]
    assert len(calls) == loads_before
    assert len(rows) == len(ATTACK_METHODS) and all("| task |" in row for row in rows)
    assert "identity-shifting" not in text and "identity-shifting" in (config.run_dir / "report.md").read_text()


def test_other_settings_in_the_same_run_dir_are_refused(demo_run):
    config, _, calls = demo_run
    with pytest.raises(ValueError, match="align_steps"):
        run_demo(replace(config, align_steps=3), load_base=tiny_loader(calls))


def test_evaluation_subsets_cover_all_categories_and_perplexity_texts_are_held_out():
    from ssah_peft.data import load_builtin

    harmful = load_builtin("harmful_eval")
    assert {r["category"] for r in spread(harmful, 12)} == set(harmful["category"])
    train, heldout = utility_split(load_builtin("utility_calibration"))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}


def test_demo_is_a_subcommand_of_the_cli():
    from ssah_peft.cli import build_parser
    from ssah_peft.cli.demo import run_demo_command

    args = build_parser().parse_args(["demo", "--quick", "--run-dir", "somewhere", "--threads", "1"])
    assert args.handler is run_demo_command and args.quick and str(args.run_dir) == "somewhere" and args.threads == 1
    assert args.attacks is None and DemoConfig.full().attacks == ["task"]
    args = build_parser().parse_args(["demo", "--attacks", "task", "identity_shift"])
    assert args.attacks == ["task", "identity_shift"]


def test_the_demo_command_runs_the_migrations_of_the_attacks_it_runs(tmp_path, monkeypatch):
    from ssah_peft.cli import build_parser
    from ssah_peft.cli import demo as demo_cli

    configs = []
    report = tmp_path / "report.md"
    report.write_text("the report")
    monkeypatch.setattr(demo_cli, "run_demo", lambda config, command: configs.append(config) or report)
    for attacks in (["identity_shift"], ["identity_shift", "task", "task"]):
        run_dir = str(tmp_path / attacks[-1])
        args = build_parser().parse_args(["demo", "--quick", "--run-dir", run_dir, "--attacks", *attacks])
        assert demo_cli.run_demo_command(args) == 0
    assert [c.attacks for c in configs] == [["identity_shift"], ["identity_shift", "task"]]
    assert configs[0].migration_runs == [] and configs[1].migration_runs == DemoConfig.quick().migration_runs


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"attacks": []}, "attacks"),
        ({"attacks": ["task", "jailbreak"]}, "jailbreak"),
        ({"attacks": ["task", "task"]}, "distinct"),
        ({"attacks": ["identity_shift"]}, "task/full"),
    ],
)
def test_settings_that_cannot_run_are_refused_when_made(settings, named):
    with pytest.raises(ValueError, match=named):
        DemoConfig.quick(**settings)


def test_one_scoring_pass_gives_the_full_half_and_wanda_maps_of_separate_passes(tmp_path):
    from ssah_peft.experiments.measures import unit_map_of, unit_maps_in_one_pass

    tokenizer = tiny_tokenizer()
    model = tiny_chat_llama(tokenizer, intermediate_size=64)
    config = DemoConfig.quick(tmp_path, calibration_pairs=6, max_length=320, show_progress=False)
    maps = unit_maps_in_one_pass(model, tokenizer, config, config.unit_fractions, rivals=("wanda",))
    separate = {
        "full": unit_map_of(model, tokenizer, config, config.unit_fractions),
        "wanda": unit_map_of(model, tokenizer, config, config.unit_fractions, method="wanda"),
        0: unit_map_of(model, tokenizer, config, config.unit_fractions, half=0),
        1: unit_map_of(model, tokenizer, config, config.unit_fractions, half=1),
    }
    for key, one_pass in (
        ("full", maps["full"]),
        ("wanda", maps["wanda"]),
        (0, maps["halves"][0]),
        (1, maps["halves"][1]),
    ):
        assert one_pass.calibration == separate[key].calibration, key
        for which in ("safety_scores", "utility_scores"):
            for kind, per_layer in getattr(one_pass, which).items():
                for mine, theirs in zip(per_layer, getattr(separate[key], which)[kind]):
                    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=0)
        assert one_pass.overlap(separate[key]) == {t: 1.0 for t in one_pass.overlap(separate[key])}, key


def test_report_draws_the_demo_runs_as_a_protection_frontier(demo_run):
    config, report, _ = demo_run
    assert "## Protection frontier" in report.read_text()
    assert (config.run_dir / "attack" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    attack = {
        f"{data}/{m.name}": json.loads((config.run_dir / "attack" / data / m.name / "result.json").read_text())
        for data in config.attacks
        for m in ATTACK_METHODS
    }
    unit_map = UnitMap.load(config.run_dir / "units" / "unitmap_aligned.safetensors")
    total = sum(map(sum, unit_widths(unit_map).values()))
    points = frontier_points_of(attack, total)
    assert len(points) == len(attack)
    controls = {m.name for m in RANDOM_CONTROLS.values()}
    for point, result in zip(points, attack.values()):
        frozen = sum(n for blocks in result.get("unit_counts", {}).values() for n in blocks.values())
        assert (point.panel, point.asr, point.accuracy) == (
            result["data"],
            result["metrics"]["asr"],
            result["metrics"]["task_accuracy"],
        )
        assert point.asr_range[0] <= point.asr <= point.asr_range[1]
        expected_group = "random units" if result["method"] in controls else "SSAH protect" if frozen else None
        assert point.group == (expected_group or result["method"])
        assert point.label == (f"{frozen / total:.1%}" if frozen else "")


def test_frontier_runs_train_what_their_setting_says_on_the_demos_aligned_model(demo_run, tmp_path):
    """Protect, random, dense and dense-reference frontier runs of the sweep, through the demo's own attack run."""
    config, _, _ = demo_run
    unit_map = UnitMap.load(config.run_dir / "units" / "unitmap_aligned.safetensors")
    widths = unit_widths(unit_map)
    total = sum(map(sum, widths.values()))

    def load():
        path = config.run_dir / "align" / "aligned_model"
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)

    frozen = {}
    chosen = math.floor(0.4 * total + 0.5)  # budgets round half up
    expected_units = {"protect": chosen, "dense": total - chosen, "reference": total}  # frozen, trained, trained
    for setting, chooser in (("protect", "ssah"), ("protect", "random"), ("dense", "ssah"), ("reference", "dense")):
        run = FrontierRun("task", setting, chooser, 0.0 if setting == "reference" else 0.4, seed=1)
        result = attack_result(replace(config, seed=1), load, run.attack, run.method(), unit_map, run.run_dir(tmp_path))
        assert result["method"] == run.name and (tmp_path / "task" / "seed1" / run.name / "result.json").is_file()
        counts = {
            (int(layer), kind): n for layer, blocks in result["unit_counts"].items() for kind, n in blocks.items()
        }
        frozen[(setting, chooser)] = counts
        assert sum(counts.values()) == expected_units[setting]
    # random freezes SSAH's counts per layer and kind; dense trains exactly the units protect freezes, complemented
    assert frozen[("protect", "random")] == frozen[("protect", "ssah")]
    for (layer, kind), n in frozen[("protect", "ssah")].items():
        assert frozen[("dense", "ssah")][(layer, kind)] == widths[kind][layer] - n
