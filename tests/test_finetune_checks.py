"""`ssah-peft finetune`'s checks and run folder (issues 24 and 25): every option, template, output path and "is
anything left to train" refused before a model is loaded (the loader is made to raise), options declared once (the
parser generated from `FinetuneOptions`), the run folder locked while a job runs, `--resume` passing over a
half-written checkpoint, and a user's `settings.json` or a replaced unit map refused with a clear message."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Interrupt, StopAfterSave

import ssah_peft
from ssah_peft import UnitMap, UnitScores
from ssah_peft._files import exclusive_lock
from ssah_peft.cli import build_parser, main
from ssah_peft.cli.finetune import _declared
from ssah_peft.cli.options import dataclass_values
from ssah_peft.finetuning import FinetuneJob, FinetuneOptions, RunRefused
from ssah_peft.finetuning.checkpoints import checkpoint_problem
from ssah_peft.finetuning.job import LOCK_FILE
from ssah_peft.scoring import model_fingerprint

FAST = ["--calibration-samples", "8", "--max-length", "64", "--max-steps", "4", "--save-steps", "2", "--no-progress"]
LIBRARY_FAST = dict(calibration_samples=8, max_length=64, max_steps=4, save_steps=2, show_progress=False)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: every check below must come before it."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(ssah_peft.models, "load", load)


def unit_map_of(checkpoint: Path, seed: int, **proportions) -> UnitMap:
    """A unit map of the checkpoint's model from random scores (``proportions``: ``scu``/``ucu``/``ru``)."""
    from transformers import AutoModelForCausalLM

    fingerprint = model_fingerprint(AutoModelForCausalLM.from_pretrained(checkpoint))
    generator = torch.Generator().manual_seed(seed)
    scores = {
        k: tuple(torch.rand(w, dtype=torch.float64, generator=generator) for w in widths)
        for k, widths in fingerprint["widths"].items()
    }
    s = UnitScores(scores=scores, method="variance", num_tokens=1, num_sequences=1, fingerprint=fingerprint)
    other = {k: tuple(1 - t for t in ts) for k, ts in scores.items()}
    u = UnitScores(scores=other, method="variance", num_tokens=1, num_sequences=1, fingerprint=fingerprint)
    return UnitMap.from_scores(s, u, **proportions)


def snapshot(root: Path) -> dict[str, bytes]:
    return (
        {str(p): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))} if root.exists() else {}
    )


# ----------------------------------------------------------------------------------------------------
# Every check before a model is loaded or anything is written
# ----------------------------------------------------------------------------------------------------

BAD_LIBRARY_OPTIONS = {
    "epochs inf": (dict(epochs=math.inf), "epochs: must be a finite number, got inf"),
    "batch_size 2.5": (dict(batch_size=2.5), "batch_size: must be an integer, got 2.5"),
    "rank True": (dict(rank=True), "rank: must be an integer, got True"),
    "seed -1": (dict(seed=-1), "seed: must be an integer in [0, 4294967295], got -1"),
    "seed 2**40": (dict(seed=2**40), "seed: must be an integer in [0, 4294967295]"),
    "learning_rate text": (dict(learning_rate="1e-4"), "learning_rate: must be a finite number, got '1e-4'"),
    "learning_rate inf": (dict(learning_rate=math.inf), "learning_rate: must be a finite number, got inf"),
    "learning_rate 0": (dict(learning_rate=0.0), "learning_rate: must be a finite number > 0, got 0.0"),
    "evaluate 1": (dict(evaluate=1), "evaluate: must be True or False, got 1"),
    "every unit protected": (dict(unit_types=("SCU", "UCU", "CU", "RU")), "freezes every unit: nothing would be"),
    "template syntax": (dict(chat_template="{% for m in messages %}{{ m }"), "is not a valid Jinja chat template"),
    "dtype": (dict(dtype="int8"), "dtype: must be auto or a torch floating-point dtype"),
}


@pytest.mark.parametrize("case", list(BAD_LIBRARY_OPTIONS))
def test_bad_library_options_are_refused_before_the_model_loads(
    tmp_path, checkpoint, train_file, no_model_loading, case
):
    options, message = BAD_LIBRARY_OPTIONS[case]
    with pytest.raises(ValueError) as error:
        ssah_peft.finetune(str(checkpoint), str(train_file), tmp_path / "run", **LIBRARY_FAST, **options)
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_an_unknown_library_option_names_the_close_one(tmp_path, checkpoint, train_file, no_model_loading):
    with pytest.raises(TypeError, match=r"unknown options 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        ssah_peft.finetune(str(checkpoint), str(train_file), tmp_path / "run", learning_rat=1e-4)
    assert not (tmp_path / "run").exists()


def _bad_template(root: Path) -> list[str]:
    template = root / "bad.jinja"
    template.write_text("{% for message in messages %}{{ message['content'] }}\n{% endfor", encoding="utf-8")
    return ["--chat-template", str(template)]


def _below_a_file(root: Path) -> list[str]:
    (root / "taken").write_text("a file", encoding="utf-8")
    return ["--out", str(root / "taken" / "run")]


def _users_settings(root: Path) -> list[str]:
    (root / "run").mkdir()
    (root / "run" / "settings.json").write_text("timeout = 30\n", encoding="utf-8")
    return []


def _map_protecting_everything(root: Path, checkpoint: Path) -> list[str]:
    path = root / "scu-and-cu-only.safetensors"
    unit_map_of(checkpoint, seed=1, ucu=0.0, ru=0.0).save(path)  # every unit is SCU or CU: protect freezes all
    return ["--unit-map", str(path)]


def _map_without_redundant_units(root: Path, checkpoint: Path) -> list[str]:
    path = root / "no-ru.safetensors"
    unit_map_of(checkpoint, seed=1, ru=0.0).save(path)
    return ["--unit-map", str(path), "--mode", "select"]


# (arguments, or a function making them from the test's folder and the checkpoint; message; exit status)
BAD_COMMANDS = {
    "protect everything": (["--protect", "SCU,UCU,CU,RU"], "freezes every unit: nothing would be trained", 1),
    "seed -1": (["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got -1", 2),
    "seed 2**40": (["--seed", str(2**40)], "argument --seed: must be an integer in [0, 4294967295]", 2),
    "epochs inf": (["--epochs", "inf"], "argument --epochs: must be a finite number, got inf", 2),
    "batch size 2.5": (["--batch-size", "2.5"], "argument --batch-size: expected an integer, got '2.5'", 2),
    "template syntax": (
        lambda root, _: _bad_template(root),
        "bad.jinja: is not a valid Jinja chat template: line 2",
        1,
    ),
    "out below a file": (lambda root, _: _below_a_file(root), "cannot be created: ", 1),
    "user's settings.json": (
        lambda root, _: _users_settings(root),
        "settings.json is not the settings file of an ssah-peft run (not valid JSON",
        1,
    ),
    "map protecting every unit": (
        _map_protecting_everything,
        "protecting SCU + all CU freezes every unit of the model in this unit map: nothing would be trained",
        1,
    ),
    "map without the selected units": (_map_without_redundant_units, "the unit map has no RU units", 1),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_each_refusal_comes_before_the_model_loads_and_writes_nothing(
    tmp_path, checkpoint, train_file, no_model_loading, case, capsys
):
    arguments, message, status = BAD_COMMANDS[case]
    extra = arguments(tmp_path, checkpoint) if callable(arguments) else arguments
    before = snapshot(tmp_path)
    command = ["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *FAST, *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == status
    last = err.strip().splitlines()[-1]  # after the progress bars of the test's own unit maps
    assert last.startswith(("ssah-peft: error: ", "ssah-peft finetune: error: ")), err
    assert message in last and "Traceback" not in err, err
    assert snapshot(tmp_path) == before  # nothing written, created or changed


def test_a_scored_map_that_leaves_nothing_to_train_is_refused_before_anything_is_written(
    tmp_path, checkpoint, train_file, monkeypatch, capsys
):
    """Without --unit-map only the scores can tell: the refusal comes after scoring, but before the run folder."""
    monkeypatch.setattr(FinetuneJob, "_score", lambda job: unit_map_of(checkpoint, seed=2, ru=0.0))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(out), "--mode", "select"])
    assert exit_info.value.code == 1
    assert "the unit map has no RU units: nothing would be trained" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(RunRefused):  # the library raises the same refusal
        ssah_peft.finetune(str(checkpoint), str(train_file), out, mode="select", evaluate=False, **LIBRARY_FAST)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# Options declared once
# ----------------------------------------------------------------------------------------------------


def test_the_command_line_options_are_the_dataclass_fields_with_their_defaults(tmp_path):
    """Every field is an option of its own or declared by the command; the defaults parsed are the fields'."""
    parser = build_parser()
    args = parser.parse_args(["finetune", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path)])
    declared = _declared()
    values = dataclass_values(args, FinetuneOptions, declared)
    for field in dataclasses.fields(FinetuneOptions):
        assert field.metadata.get("help"), f"{field.name} has no help"
        if field.name in ("model", "data", "out"):
            continue
        if field.name in declared:
            assert field.name not in values
        else:
            assert values[field.name] == field.default, field.name
    # a value parsed from the command line goes through the field's check, with the library's message
    with pytest.raises(ValueError, match=r"seed: must be an integer in \[0, 4294967295\]"):
        FinetuneOptions(model="m", data="d", out=tmp_path, seed=-1)
    negated = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--out", "o", "--no-eval", "--no-progress"])
    flags = dataclass_values(negated, FinetuneOptions, declared)
    assert flags["evaluate"] is False and flags["show_progress"] is False


# ----------------------------------------------------------------------------------------------------
# The run folder: a lock, half-written checkpoints, a replaced unit map
# ----------------------------------------------------------------------------------------------------


def test_a_second_job_into_a_locked_run_folder_is_refused_naming_the_holder(tmp_path, checkpoint, train_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with exclusive_lock(out / LOCK_FILE, f"run folder {out}"):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(SystemExit) as exit_info:
            main(["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(out), *FAST])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (
            f"ssah-peft: error: run folder {out} is in use by another process (process {os.getpid()}); "
            "wait for that job to end, or choose another output folder"
        )
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the other job wrote nothing
    assert not (out / LOCK_FILE).exists()  # the holder removes it at its end


HOLD_LOCK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", {files!r})  # without the package: a quick start
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
with files.exclusive_lock({path!r}, "run folder"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_run_folder_lock_excludes_another_process_and_is_free_when_it_ends(tmp_path):
    path = tmp_path / LOCK_FILE
    script = HOLD_LOCK.format(files=str(Path(ssah_peft.__file__).parent / "_files.py"), path=str(path))
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BlockingIOError) as error:
            with exclusive_lock(path, "run folder"):
                pass
        assert error.value.strerror == f"run folder is in use by another process (process {holder.pid})"
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not path.exists()
    with exclusive_lock(path, "run folder"):  # free once its holder ended
        assert path.read_text().strip() == str(os.getpid())


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, checkpoint, train_file) -> Path:
    """A protect run (no evaluation) killed right after its checkpoint of step 4, before its adapter was saved."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Interrupt):
        ssah_peft.finetune(
            str(checkpoint), str(train_file), out, callbacks=[StopAfterSave(4)], evaluate=False, **LIBRARY_FAST
        )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter").exists() and not (out / LOCK_FILE).exists()
    return out


def _copy(run: Path, root: Path) -> Path:
    out = root / "run"
    shutil.copytree(run, out)
    return out


def test_a_half_written_checkpoint_is_named(interrupted_run, tmp_path):
    out = _copy(interrupted_run, tmp_path)
    last = out / "checkpoints" / "checkpoint-4"
    assert checkpoint_problem(last) is None
    (last / "trainer_state.json").write_text('{"global_step": 4, "log_hi', encoding="utf-8")
    assert checkpoint_problem(last) == "trainer_state.json is not complete JSON"
    (last / "trainer_state.json").unlink()
    assert checkpoint_problem(last) == "no trainer_state.json"
    shutil.copy(interrupted_run / "checkpoints" / "checkpoint-4" / "trainer_state.json", last)
    optimizer = last / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    assert checkpoint_problem(last) == "optimizer.pt is truncated or damaged"


def test_resume_passes_over_a_half_written_checkpoint(interrupted_run, tmp_path, checkpoint, train_file, capsys):
    out = _copy(interrupted_run, tmp_path)
    tensors = out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-64])  # a kill during the Trainer's save
    (out / LOCK_FILE).write_text("999999\n", encoding="utf-8")  # a killed job's stale lock: no one holds it
    command = ["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(out), "--no-eval"]
    assert main([*command, *FAST, "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert (
        f"{out / 'checkpoints' / 'checkpoint-4'} is incomplete (adapter_model.safetensors is truncated or damaged: "
        "its save was interrupted); passed over" in stdout
    )
    assert "resuming from checkpoint-2, the last complete checkpoint" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and [e["step"] for e in report["loss_curve"]] == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-4") is None  # written again, whole
    assert not (out / LOCK_FILE).exists()


def test_resume_refuses_a_replaced_unit_map(
    interrupted_run, tmp_path, checkpoint, train_file, no_model_loading, capsys
):
    out = _copy(interrupted_run, tmp_path)
    unit_map_of(checkpoint, seed=3).save(out / "unitmap.safetensors")
    before = snapshot(out)
    command = ["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(out), "--no-eval"]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *FAST, "--resume"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ssah-peft: error: {out / 'unitmap.safetensors'} is not the unit map this run was trained")
    assert f"than {out / 'checkpoints' / 'checkpoint-4'} holds (was it replaced?)" in err
    assert snapshot(out) == before


def test_a_scored_map_is_reused_for_the_same_inputs_and_scored_again_otherwise(
    tmp_path, checkpoint, train_file, monkeypatch, capsys
):
    from ssah_peft.finetuning import job
    from ssah_peft.models import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # empty: earlier tests' jobs cached maps of these inputs
    scored = []
    score = job.unit_map_from_calibration
    monkeypatch.setattr(job, "unit_map_from_calibration", lambda *a, **k: scored.append(1) or score(*a, **k))
    options = dict(LIBRARY_FAST, max_steps=1, evaluate=False)
    cache = tmp_path / "cache" / "unit_maps"
    before: set[Path] = set()

    def run(name: str, **changes) -> bytes:
        ssah_peft.finetune(str(checkpoint), str(train_file), tmp_path / name, **{**options, **changes})
        return (tmp_path / name / "unitmap.safetensors").read_bytes()

    first = run("a")
    (kept,) = set(cache.glob("*.safetensors")) - before
    assert len(scored) == 1 and kept.read_bytes() == first
    capsys.readouterr()
    assert run("b") == first and len(scored) == 1  # the same weights, data and settings: not scored again
    assert (
        f"Reusing the unit map scored earlier for these weights, data and settings: {kept}" in capsys.readouterr().out
    )
    assert run("c", reuse_scores=False) == first and len(scored) == 2  # --rescore
    kept.write_bytes(b"not a map")  # a damaged cache file is never trusted: scored again and replaced
    assert run("d") == first and len(scored) == 3 and kept.read_bytes() == first
    run("e", calibration_samples=6)  # other calibration data: another map
    assert len(scored) == 4 and len(set(cache.glob("*.safetensors")) - before) == 2
    settings = json.loads((tmp_path / "c" / "settings.json").read_text())
    assert "reuse_scores" not in settings  # the same adapter either way: not pinned
