"""`ssah-peft finetune --control random` and `--chooser/--budget` (issue 26, item 6): the same job trains a second
adapter on random units of the chosen units' per-layer and per-kind counts and reports both side by side; the draw
is reproducible from the seed and blind to the chosen positions; a resumed run skips a finished control and retrains
a missing one to the same adapter; a chooser by score freezes its budget of the ranked units of a map of its scorer;
bad values are refused before a model loads."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import ssah_peft
from ssah_peft import UnitMap
from ssah_peft.cli import main
from ssah_peft.evaluate import wilson_interval
from ssah_peft.finetuning import FinetuneOptions, method_for
from ssah_peft.finetuning.control import control_method
from ssah_peft.finetuning.report import control_lines
from ssah_peft.training import UnitSelector
from ssah_peft.unit_map import choose_units, counts_per_block, unit_widths
from ssah_peft.units import union_units

FAST = ["--calibration-samples", "8", "--max-length", "64", "--max-steps", "3", "--save-steps", "2", "--no-progress"]
LIBRARY_FAST = dict(calibration_samples=8, max_length=64, max_steps=3, save_steps=2, show_progress=False)


def refuse_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the refusal")


def adapter_units(adapter: Path) -> dict:
    return union_units(json.loads((adapter / "adapter_config.json").read_text())["units"])


@pytest.fixture(scope="module")
def protect_run(tmp_path_factory, checkpoint, train_file):
    """A protect run with its random control, evaluated, through the CLI: its folder and what it printed."""
    out = tmp_path_factory.mktemp("runs") / "protect"
    args = ["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(out), "--control", "random"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*args, *FAST, "--eval-limit", "2", "--max-new-tokens", "2"]) == 0
    return out, stdout.getvalue()


def test_the_control_freezes_random_units_of_the_same_counts_and_is_reported_beside_the_choice(
    protect_run, checkpoint, train_file
):
    out, stdout = protect_run
    chosen, control = adapter_units(out / "adapter"), adapter_units(out / "control_adapter")
    assert counts_per_block(control) == counts_per_block(chosen) and sum(counts_per_block(chosen).values()) > 0
    assert control != chosen
    # the units are the seeded draw: the control of the job's method with the job's seed, from the run's map
    options = FinetuneOptions(model=str(checkpoint), data=str(train_file), out=out, control="random")
    unit_map = UnitMap.load(out / "unitmap.safetensors")
    assert union_units(control_method(method_for(options), options.seed).units_of(unit_map)) == control
    assert union_units(method_for(options).units_of(unit_map)) == chosen

    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["control"] == "random"
    summary = report["control"]
    assert summary["method"] == "ssah_protect_all_cu_random" and summary["adapter"] == "control_adapter"
    assert summary["units"] == report["units"] == sum(counts_per_block(chosen).values())
    assert summary["steps"] == report["steps"] == 3 and len(summary["loss_curve"]) == 3
    assert summary["trainable_parameters"] > 0
    assert summary["after"]["asr"]["n"] == 2 and summary["after"]["perplexity"]["texts"] == 2
    assert (out / "eval_control_after.json").is_file() and (out / "generations_control_after.jsonl").is_file()
    text = (out / "report.md").read_text()
    assert "## Control: random units of the same per-layer and per-kind counts" in text
    assert "| measure | chosen (ssah_protect_all_cu) | random, same counts (ssah_protect_all_cu_random) |" in text
    assert "| attack success rate ↓ (n=2) |" in text.split("## Control")[1]
    assert "| final training loss |" in text and "One run of each is not a test" in text
    assert "## Control: random units" in stdout and "One run of each is not a test" in stdout


def test_the_draw_is_reproducible_from_the_seed_and_blind_to_the_chosen_positions(protect_run):
    out, _ = protect_run
    unit_map = UnitMap.load(out / "unitmap.safetensors")
    method = method_for(FinetuneOptions(model="m", data="d", out=out))
    chosen = method.units_of(unit_map)
    draw = control_method(method, 7).units_of(unit_map)
    assert control_method(method, 7).units_of(unit_map) == draw
    assert control_method(method, 8).units_of(unit_map) != draw
    # other units of the same counts per block: the same draw
    moved = {
        layer: {kind: list(range(len(indices))) for kind, indices in blocks.items()} for layer, blocks in chosen.items()
    }
    assert moved != chosen
    same_counts = dataclasses.replace(method, units=UnitSelector("first units", lambda _: moved))
    assert control_method(same_counts, 7).units_of(unit_map) == draw


def test_resume_skips_a_finished_control_and_retrains_a_missing_one_to_the_same_adapter(
    tmp_path, checkpoint, train_file, capsys
):
    out = tmp_path / "run"
    options = dict(calibration_samples=8, max_length=64, max_steps=3, save_steps=2, show_progress=False)
    ssah_peft.finetune(
        str(checkpoint), str(train_file), out, mode="select", control="random", evaluate=False, **options
    )
    first = load_file(out / "control_adapter" / "adapter_model.safetensors")
    report = json.loads((out / "report.json").read_text())
    assert report["control"]["after"] is None
    assert "Evaluation was switched off (`--no-eval`), so only the training losses" in (out / "report.md").read_text()

    resumed = dict(mode="select", control="random", evaluate=False, resume=True, **options)
    ssah_peft.finetune(str(checkpoint), str(train_file), out, **resumed)
    assert "control_adapter is complete: the control is not trained again" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["control"] == report["control"]

    for name in ("control_adapter", "control_checkpoints", "control.json"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    ssah_peft.finetune(str(checkpoint), str(train_file), out, **resumed)
    again = load_file(out / "control_adapter" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all((first[k] == again[k]).all() for k in first)
    assert any(first[k].abs().sum() > 0 for k in first)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(control="shuffled"), "control: must be one of random, got 'shuffled'"),
        (dict(control="random", mode="lora"), "mode 'lora' trains every unit: it has no chosen units to compare"),
        (dict(chooser="snip"), "chooser 'snip' needs a budget: the share of all units it chooses"),
        (dict(budget=0.1), "budget is for a chooser by score (snip, wanda, variance, margin_grad, conflict)"),
        (
            dict(chooser="ssah", budget=0.1),
            "chooser: must be one of types, snip, wanda, variance, margin_grad, conflict, got 'ssah'",
        ),
        (
            dict(chooser="conflict", budget=0.1, load_in_4bit=True),
            "chooser 'conflict' scores the units by gradients of the weights, which a 4-bit model has not",
        ),
        (dict(chooser="snip", budget=1.0), "budget: must be a share of the units in (0, 1), got 1.0"),
        (dict(chooser="wanda", budget=0.1, unit_types="SCU"), "it takes no unit types (--protect/--units)"),
        (dict(chooser="wanda", budget=0.1, mode="lora"), "mode 'lora' trains every unit: it takes no chooser"),
    ],
)
def test_bad_control_and_chooser_values_are_refused_before_the_model_loads(
    tmp_path, checkpoint, train_file, monkeypatch, options, message
):
    monkeypatch.setattr(ssah_peft.models, "load", refuse_loading)
    with pytest.raises(ValueError) as error:
        ssah_peft.finetune(str(checkpoint), str(train_file), tmp_path / "run", **options)
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_the_command_line_refuses_a_bad_control_or_chooser(tmp_path, checkpoint, train_file, capsys):
    args = ["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--control", "shuffled"])
    assert exit_.value.code == 2 and "invalid choice: 'shuffled'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--mode", "lora", "--control", "random"])
    assert exit_.value.code != 0
    assert "it has no chosen units to compare with random ones (--control)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--protect", "SCU", "--chooser", "snip", "--budget", "0.1"])
    assert exit_.value.code != 0
    assert "it takes no unit types (--protect/--units)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_sentence_says_the_choice_may_have_mattered_only_when_the_intervals_are_apart():
    def rate(count: int, n: int = 40) -> dict:
        low, high = wilson_interval(count, n)
        return {"n": n, "count": count, "rate": count / n, "interval95": [low, high]}

    def report(asr_chosen: int, asr_random: int) -> dict:
        control = {
            "method": "m_random",
            "adapter": "control_adapter",
            "units": 10,
            "units_drawn": "random, as X",
            "trainable_parameters": 5,
            "loss_curve": [],
            "after": {"asr": rate(asr_random), "overrefusal": rate(3), "perplexity": None},
        }
        after = {"asr": rate(asr_chosen), "overrefusal": rate(3), "perplexity": None}
        return {
            "method": "m",
            "mode": "protect",
            "after": after,
            "loss_curve": [],
            "trainable_parameters": 5,
            "control": control,
        }

    apart = "\n".join(control_lines(report(2, 30)))
    assert "differ beyond their 95% intervals: attack success rate lower with the chosen units." in apart
    assert "The choice of units may have mattered here. One run of each is not a test" in apart
    assert "| attack success rate ↓ (n=40) | 0.050 [" in apart and "| final training loss | - | - |" in apart
    close = "\n".join(control_lines(report(10, 12)))
    assert "cannot be told apart" in close and "may have mattered" not in close
    assert "One run of each is not a test" in close


def test_a_chooser_by_score_freezes_its_budget_of_the_ranked_units_and_takes_its_control(
    tmp_path, checkpoint, train_file
):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(out), "--no-eval"]
    assert main([*args, *FAST, "--chooser", "snip", "--budget", "0.1", "--control", "random"]) == 0
    unit_map = UnitMap.load(out / "unitmap.safetensors")
    assert unit_map.calibration["safety"]["method"] == "snip"  # scored now by the chooser's scorer
    chosen = adapter_units(out / "adapter")
    assert chosen == union_units(choose_units(unit_map, 0.1, "protect", rule="difference"))
    total = sum(sum(widths) for widths in unit_widths(unit_map).values())
    assert sum(counts_per_block(chosen).values()) == pytest.approx(0.1 * total, abs=1)
    control = adapter_units(out / "control_adapter")
    assert counts_per_block(control) == counts_per_block(chosen) and control != chosen
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "ssah_protect_snip" and report["unit_types"] == []
    assert report["settings"]["chooser"] == "snip" and report["settings"]["budget"] == 0.1
    assert report["units_chosen_by"] == "protect 10.0% by snip (global, difference)"
    assert f"units protect 10.0% by snip (global, difference): {report['units']:,})" in (out / "report.md").read_text()


@pytest.mark.parametrize("chooser", ["margin_grad", "conflict"])
def test_an_attribution_chooser_scores_its_map_on_the_users_data_and_freezes_its_budget(
    tmp_path, checkpoint, train_file, chooser
):
    out = tmp_path / "run"
    result = ssah_peft.finetune(
        str(checkpoint), str(train_file), out, chooser=chooser, budget=0.1, evaluate=False, **LIBRARY_FAST
    )
    unit_map = UnitMap.load(out / "unitmap.safetensors")
    assert unit_map.calibration["safety"]["method"] == chooser
    assert unit_map.calibration["safety"]["other"] == str(train_file)  # the user's data: utility prompts or task
    chosen = adapter_units(out / "adapter")
    assert chosen == union_units(choose_units(unit_map, 0.1, "protect", rule="difference"))
    assert result.report["units_chosen_by"] == f"protect 10.0% by {chooser} (global, difference)"


def test_a_given_map_of_another_scorer_is_refused_before_the_model_loads(
    tmp_path, protect_run, checkpoint, train_file, monkeypatch
):
    monkeypatch.setattr(ssah_peft.models, "load", refuse_loading)
    variance_map = str(protect_run[0] / "unitmap.safetensors")
    with pytest.raises(ValueError, match="from a snip map, got a variance map"):
        ssah_peft.finetune(
            str(checkpoint), str(train_file), tmp_path / "run", chooser="snip", budget=0.1, unit_map=variance_map
        )
    assert not (tmp_path / "run").exists()
