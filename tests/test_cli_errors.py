"""The `ssah-peft` command line refuses bad options, paths and files before any work, without writing anything,
and reports user errors as one `ssah-peft: error: ...` line naming the file and the fix (issue 13, items 4 and 5).

The model loader is replaced by one that records its calls and stops, so a test shows that a refused run never
reached it, and a run that passed the checks did."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import model_scores, tiny_model, tiny_tokenizer
from safetensors.torch import save_file

from ssah_peft import UnitMap, models
from ssah_peft.cli import analysis as commands
from ssah_peft.cli import build_parser, main, read_pairs
from ssah_peft.cli import demo as demo_cli
from ssah_peft.cli import units as units_cli
from ssah_peft.experiments import demo
from ssah_peft.scoring import PARTIAL_FILE_FORMAT


class ModelLoaded(Exception):
    """Raised by the replaced loader: the run got past every check."""


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The names the commands asked the loader for; the loader stops the run with :class:`ModelLoaded`."""
    calls: list[str] = []

    def load(name, **kwargs):
        calls.append(str(name))
        raise ModelLoaded(str(name))

    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(demo, "load", load)
    monkeypatch.setattr(demo_cli, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    return calls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny llama with its tokenizer, calibration data, a unit map of the model and one of another model."""
    root = tmp_path_factory.mktemp("cli-errors")
    checkpoint = root / "model"
    model = tiny_model("llama", vocab_size=128).float()
    model.save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(3)))
    unit_map = root / "unitmap.safetensors"
    UnitMap.from_scores(model_scores(model, 1), model_scores(model, 2)).save(unit_map)
    other = tiny_model("llama", vocab_size=128, intermediate_size=64).float()  # other MLP widths
    other_map = root / "other.safetensors"
    UnitMap.from_scores(model_scores(other, 1), model_scores(other, 2)).save(other_map)
    return checkpoint, data, unit_map, other_map


def snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and folder under ``roots`` with its bytes and modification time."""
    return {
        str(path): (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else (b"<dir>", 0)
        for root in roots
        for path in sorted(root.rglob("*"))
    }


def refused(capsys, argv: list[str], status: int = 2) -> str:
    """The one-line error of a run that must stop with ``status``; no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == status
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = captured.err.splitlines()  # after any progress bars of the loader
    first = max(i for i, line in enumerate(lines) if re.match(r"ssah-peft( [\w-]+)*: error: ", line))
    return " ".join(" ".join(lines[first:]).split())  # argparse wraps long lines


def score_command(files, *extra: str, utility_data=None) -> list[str]:
    checkpoint, data, _, _ = files
    utility = str(utility_data or data)
    return [
        *("score", "--model", str(checkpoint), "--safety-data", str(data), "--utility-data", utility),
        *("--no-progress", *extra),
    ]


# ----------------------------------------------------------------------------------------------------
# Item 4: outputs and options are checked before the model is loaded; nothing is overwritten
# ----------------------------------------------------------------------------------------------------


def test_score_refuses_to_overwrite_the_models_weights(files, tmp_path, capsys, loads):
    checkpoint = files[0]
    weights = checkpoint / "model.safetensors"
    before = snapshot(checkpoint)
    message = refused(capsys, score_command(files, "--out", str(weights)))
    assert message.startswith("ssah-peft: error: ") and str(weights) in message
    assert "not an ssah-peft unit map" in message and "--overwrite" in message
    assert snapshot(checkpoint) == before and loads == []

    # a map of ours may be replaced, as may anything with --overwrite: both runs get past the checks
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out, extra in ((files[2], []), (notes, ["--overwrite"])):
        with pytest.raises(ModelLoaded):
            main(score_command(files, "--out", str(out), *extra))
    assert len(loads) == 2 and notes.read_text() == "mine"


def partial_file(path: Path) -> Path:
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": PARTIAL_FILE_FORMAT, "format_version": "1"})
    return path


@pytest.mark.parametrize(
    "case",
    [
        "score-out-missing-dir",
        "score-out-dir",
        "score-plot-missing-dir",
        "score-plot-foreign",
        "score-out-is-plot",
        "partial-out-foreign",
        "merge-out-is-input",
        "eval-out-file",
        "eval-out-foreign-report",
        "probe-out-file",
        "ablate-out-file",
        "scan-out-file",
        "scan-out-map-missing-dir",
        "scan-out-map-foreign",
        "report-foreign-md",
        "show-plot-foreign",
        "demo-run-dir-file",
    ],
)
def test_outputs_are_checked_before_any_work(case, files, tmp_path, capsys, loads, monkeypatch):
    checkpoint, _, unit_map, _ = files
    monkeypatch.setattr(units_cli, "merge_partial_scores", lambda paths: pytest.fail("merged"))
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("not ours")
    missing = tmp_path / "missing" / "out.safetensors"
    model = ["--model", str(checkpoint), "--no-progress"]
    scan_run = ["scan", *model, "--unit-map", str(unit_map), "--out-dir", str(tmp_path / "run")]
    argv, named = {
        "score-out-missing-dir": (score_command(files, "--out", str(missing)), [str(missing.parent), "mkdir"]),
        "score-out-dir": (score_command(files, "--out", str(tmp_path)), [str(tmp_path), "folder"]),
        "score-plot-missing-dir": (
            score_command(files, "--out", str(tmp_path / "m.safetensors"), "--plot", str(tmp_path / "no" / "p.png")),
            ["--plot", str(tmp_path / "no")],
        ),
        "score-plot-foreign": (
            score_command(files, "--out", str(tmp_path / "m.safetensors"), "--plot", str(foreign)),
            ["--plot", str(foreign), "--overwrite"],
        ),
        "score-out-is-plot": (
            score_command(files, "--out", str(tmp_path / "m.safetensors"), "--plot", str(tmp_path / "m.safetensors")),
            ["--plot", "--out"],
        ),
        "partial-out-foreign": (
            score_command(files, "--shard", "0/2", "--partial-out", str(foreign)),
            ["--partial-out", str(foreign)],
        ),
        "merge-out-is-input": (
            [
                "units",
                "merge-scores",
                str(partial_file(tmp_path / "p0.safetensors")),
                str(partial_file(tmp_path / "p1.safetensors")),
                "--out",
                str(tmp_path / "p0.safetensors"),
            ],
            [str(tmp_path / "p0.safetensors"), "--overwrite"],
        ),
        "eval-out-file": (["eval", *model, "--out", str(foreign)], ["--out", str(foreign), "not a folder"]),
        "eval-out-foreign-report": (["eval", *model, "--out", str(tmp_path)], [str(tmp_path / "report.json")]),
        "probe-out-file": (["probe", *model, "--out-dir", str(foreign)], ["--out-dir", str(foreign)]),
        "ablate-out-file": (
            ["ablate", *model, "--unit-map", str(unit_map), "--out-dir", str(foreign)],
            ["--out-dir", str(foreign)],
        ),
        "scan-out-file": (
            ["scan", *model, "--unit-map", str(unit_map), "--out-dir", str(foreign)],
            ["--out-dir", str(foreign)],
        ),
        "scan-out-map-missing-dir": ([*scan_run, "--out-map", str(missing)], ["--out-map", str(missing.parent)]),
        "scan-out-map-foreign": (
            [*scan_run, "--out-map", str(foreign)],
            ["--out-map", str(foreign), "--overwrite"],
        ),
        "report-foreign-md": (["report", str(tmp_path)], [str(tmp_path / "report.md"), "--overwrite"]),
        "show-plot-foreign": (["units", "show", str(unit_map), "--plot", str(foreign)], ["--plot", str(foreign)]),
        "demo-run-dir-file": (["demo", "--run-dir", str(foreign)], ["--run-dir", str(foreign)]),
    }[case]
    if case == "eval-out-foreign-report":
        (tmp_path / "report.json").write_text('{"my": "own report"}')
    if case == "report-foreign-md":
        (tmp_path / "probe.json").write_text("{}")
        (tmp_path / "report.md").write_text("# My notes\n")
    before = snapshot(tmp_path, checkpoint)
    message = refused(capsys, argv)
    for part in named:
        assert part in message, (part, message)
    assert snapshot(tmp_path, checkpoint) == before and loads == []


@pytest.mark.parametrize(
    "command, options, named",
    [
        ("score", ["--scu", "1.5"], "--scu"),
        ("score", ["--ru", "-0.1"], "--ru"),
        ("score", ["--ucu", "nan"], "--ucu"),
        ("score", ["--scu", "0.5", "--ucu", "0.4", "--ru", "0.2"], "--scu + --ucu + --ru"),
        ("score", ["--composite-fraction", "1.5"], "--composite-fraction"),
        (
            "score",
            ["--scu", "0.3", "--ucu", "0.3", "--ru", "0.3", "--composite-fraction", "0.2"],
            "--composite-fraction",
        ),
        ("score", ["--batch-size", "0"], "--batch-size"),
        ("score", ["--max-length", "0"], "--max-length"),
        ("score", ["--num-samples", "0"], "--num-samples"),
        ("merge", ["--scu", "0.6", "--ucu", "0.6"], "--scu + --ucu + --ru"),
        ("eval", ["--batch-size", "0"], "--batch-size"),
        ("eval", ["--max-new-tokens", "0"], "--max-new-tokens"),
        ("eval", ["--limit", "0"], "--limit"),
        ("probe", ["--limit", "-1"], "--limit"),
        ("probe", ["--max-appended", "0"], "--max-appended"),
        ("probe", ["--batch-size", "0"], "--batch-size"),
        ("ablate", ["--max-new-tokens", "0"], "--max-new-tokens"),
        ("ablate", ["--batch-size", "0"], "--batch-size"),
        ("scan", ["--fractions", "0.1", "0"], "--fractions"),
        ("scan", ["--fractions", "1.5"], "--fractions"),
        ("scan", ["--limit", "0"], "--limit"),
        ("demo", ["--threads", "0"], "--threads"),
    ],
)
def test_options_are_checked_before_any_work(command, options, named, files, tmp_path, capsys, loads, monkeypatch):
    checkpoint, _, unit_map, _ = files
    monkeypatch.setattr(units_cli, "merge_partial_scores", lambda paths: pytest.fail("merged"))
    model = ["--model", str(checkpoint), "--no-progress"]
    argv = {
        "score": score_command(files, "--out", str(tmp_path / "map.safetensors")),
        "merge": [
            "units",
            "merge-scores",
            str(partial_file(tmp_path / "p.safetensors")),
            "--out",
            str(tmp_path / "map.safetensors"),
        ],
        "eval": ["eval", *model, "--out", str(tmp_path / "eval")],
        "probe": ["probe", *model, "--out-dir", str(tmp_path / "run")],
        "ablate": ["ablate", *model, "--unit-map", str(unit_map), "--out-dir", str(tmp_path / "run")],
        "scan": ["scan", *model, "--unit-map", str(unit_map), "--out-dir", str(tmp_path / "run")],
        "demo": ["demo", "--run-dir", str(tmp_path / "demo")],
    }[command]
    before = snapshot(tmp_path, checkpoint)
    message = refused(capsys, [*argv, *options])
    assert named in message, message
    assert snapshot(tmp_path, checkpoint) == before and loads == []


def test_a_model_path_that_does_not_exist_is_named_and_hub_ids_reach_the_loader(
    files, tmp_path, capsys, loads, monkeypatch
):
    checkpoint = files[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    out = ["--out", str(tmp_path / "map.safetensors")]
    cases = {  # --model value: what the error says
        "./missing-model": "does not exist",
        str(tmp_path / "missing-model"): "does not exist",
        "runs/align/checkpoint-10": "does not exist",  # more than one '/': a path, never a hub id
        "runs/align": "does not exist",  # the folder runs/ exists here: a path
        "~/surely-missing-ssah-peft-model": "does not exist",
        "empty": "config.json",  # a folder, but no checkpoint
        "weights.bin": "is a file",
    }
    for value, reason in cases.items():
        message = refused(capsys, score_command(files, *out)[:1] + ["--model", value] + score_command(files, *out)[3:])
        assert f"--model {value}" in message and reason in message, message
    message = refused(capsys, ["eval", "--model", str(checkpoint), "--adapter", "./no-adapter"])
    assert "--adapter ./no-adapter" in message and "does not exist" in message
    message = refused(capsys, ["eval", "--model", str(checkpoint), "--adapter", str(checkpoint)])
    assert "adapter_config.json" in message
    message = refused(capsys, ["eval", "--model", str(checkpoint), "--judge", "./no-judge"])
    assert "--judge ./no-judge" in message
    message = refused(capsys, ["probe", "--model", "./missing-model", "--out-dir", "run"])
    assert "--model ./missing-model" in message
    assert loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "runs", "weights.bin"]

    # a hub id (owner/name, or a bare name) that is not a local path goes to the loader as before
    for hub_id in ("someorg/some-model", "gpt2"):
        with pytest.raises(ModelLoaded):
            main(["score", "--model", hub_id, *score_command(files, *out)[3:]])
    assert loads == ["someorg/some-model", "gpt2"]


def test_a_checkpoint_whose_weights_were_replaced_by_a_unit_map_is_refused(files, tmp_path, capsys, loads):
    checkpoint, _, unit_map, _ = files
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(unit_map.read_bytes())
    message = refused(capsys, ["probe", "--model", str(broken), "--out-dir", str(tmp_path / "run")])
    assert str(broken / "model.safetensors") in message and "unit map" in message
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # damaged weights: named before the load
    message = refused(capsys, ["probe", "--model", str(broken), "--out-dir", str(tmp_path / "run")], status=1)
    assert message.startswith(f"ssah-peft: error: {broken / 'model.safetensors'}: not a safetensors file")
    assert loads == [] and not (tmp_path / "run").exists()


def test_scan_checks_the_unit_map_against_the_loaded_model_before_scanning(files, tmp_path, capsys, monkeypatch):
    checkpoint, _, _, other_map = files
    checked = []
    check_model = UnitMap.check_model

    def spy(self, model, **options):
        checked.append(model)
        return check_model(self, model, **options)

    monkeypatch.setattr(UnitMap, "check_model", spy)
    monkeypatch.setattr(commands, "degradation_scan", lambda *a, **k: pytest.fail("scanned"))
    monkeypatch.setattr(commands, "cheap_metrics", lambda *a, **k: pytest.fail("metrics built"))
    run_dir = tmp_path / "run"
    message = refused(
        capsys,
        [
            "scan",
            "--model",
            str(checkpoint),
            "--unit-map",
            str(other_map),
            "--out-dir",
            str(run_dir),
            "--out-map",
            str(tmp_path / "after.safetensors"),
            "--no-progress",
        ],
        status=1,
    )
    assert message.startswith(f"ssah-peft: error: {other_map}: ") and "Score this model instead" in message
    assert len(checked) == 1 and type(checked[0]).__name__ == "LlamaForCausalLM"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# Item 5: errors a user can act on
# ----------------------------------------------------------------------------------------------------

NOT_UTF8 = "caf\xe9".encode("latin-1")


def test_non_utf8_data_names_the_file_and_line(files, tmp_path, capsys, loads):
    checkpoint, data, _, _ = files
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n\n{"prompt": "' + NOT_UTF8 + b'", "response": "b"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:3: .*UTF-8"):
        read_pairs(str(bad))
    command = score_command(files, "--out", str(tmp_path / "m.safetensors"), utility_data=bad)
    message = refused(capsys, command, status=1)
    assert re.search(rf"^ssah-peft: error: {re.escape(str(bad))}:3: .*UTF-8", message), message

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "a"}\n{"prompt": "' + NOT_UTF8 + b'"}\n')
    message = refused(
        capsys,
        ["probe", "--model", str(checkpoint), "--prompts", str(prompts), "--out-dir", str(tmp_path / "run")],
        status=1,
    )
    assert f"{prompts}:2: " in message and "UTF-8" in message
    prompts.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    message = refused(
        capsys,
        ["probe", "--model", str(checkpoint), "--prompts", str(prompts), "--out-dir", str(tmp_path / "run")],
        status=1,
    )
    assert f"{prompts}:2: " in message and "'prompt'" in message

    template = tmp_path / "template.jinja"
    template.write_bytes(b"{{ messages }}\n{# " + NOT_UTF8 + b" #}\n")
    message = refused(
        capsys,
        [*score_command(files, "--out", str(tmp_path / "m.safetensors")), "--chat-template", str(template)],
        status=1,
    )
    assert f"{template}:2: " in message and "UTF-8" in message
    assert loads == [] and not (tmp_path / "run").exists() and not (tmp_path / "m.safetensors").exists()


def test_unreadable_files_are_named_and_bugs_keep_their_traceback(files, tmp_path, capsys, loads, monkeypatch):
    checkpoint, _, unit_map, _ = files
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    for argv in (
        ["units", "show", str(garbage)],
        ["units", "compare", str(unit_map), str(garbage)],
        [
            "units",
            "merge-scores",
            str(partial_file(tmp_path / "p.safetensors")),
            str(garbage),
            "--out",
            str(tmp_path / "m.safetensors"),
        ],
        ["ablate", "--model", str(checkpoint), "--unit-map", str(garbage), "--out-dir", str(tmp_path / "r")],
    ):
        message = refused(capsys, argv, status=1)
        assert message.startswith(f"ssah-peft: error: {garbage}: ") and "safetensors" in message, message
    message = refused(capsys, ["units", "show", str(checkpoint / "model.safetensors")], status=1)
    assert f"{checkpoint / 'model.safetensors'}" in message and "not an ssah-peft unit map" in message
    message = refused(capsys, ["units", "migrate", str(unit_map), str(tmp_path / "missing.safetensors")])
    assert f"{tmp_path / 'missing.safetensors'}" in message and "does not exist" in message
    message = refused(capsys, ["report", str(tmp_path / "no-run")])
    assert str(tmp_path / "no-run") in message and "does not exist" in message
    assert loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["garbage.safetensors", "p.safetensors"]

    # an error of the program itself, not of the user's input, still shows its traceback
    monkeypatch.setattr(UnitMap, "summary", lambda self: math.sqrt(-1))
    with pytest.raises(ValueError, match="math domain error"):
        main(["units", "show", str(unit_map)])


def subparsers_of(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from subparsers_of(subparser)


def test_every_option_of_every_command_has_help_that_shows_its_default():
    problems = []
    parsers = list(subparsers_of(build_parser()))
    assert len(parsers) >= 13  # ssah-peft, score, units (+4), eval, probe, ablate, scan, report, demo
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            text = formatter._expand_help(action) if action.help else ""
            required = action.required or any(
                action in group._group_actions and group.required for group in parser._mutually_exclusive_groups
            )
            if not text.strip():
                problems.append(f"{name}: no help")
            elif action.option_strings and required:
                if "required" not in text:
                    problems.append(f"{name}: required but its help does not say so: {text!r}")
            elif action.option_strings and "default" not in text.lower():
                problems.append(f"{name}: no default in {text!r}")
            elif action.option_strings and action.default not in (None, False):
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
                if shown not in text:
                    problems.append(f"{name}: default {shown!r} not in {text!r}")
        assert parser.format_help()
    assert not problems, "\n".join(problems)


def test_every_command_that_loads_a_model_has_the_same_loading_options_and_device_map_rule(monkeypatch):
    from ssah_peft.cli import model_options

    parsers = {parser.prog.split()[-1]: parser for parser in subparsers_of(build_parser())}
    loading = ("--model", "--dtype", "--device-map", "--load-in-4bit")
    for command in ("score", "eval", "probe", "ablate", "scan"):
        actions = {option: action for action in parsers[command]._actions for option in action.option_strings}
        assert all(option in actions for option in loading), command
        assert actions["--dtype"].choices == model_options.DTYPES, command

    def args(**options):
        return argparse.Namespace(**{"device_map": None, "load_in_4bit": False, **options})

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_options.device_map(args(device_map="cuda:3", load_in_4bit=True)) == "cuda:3"  # given: used as is
    assert model_options.device_map(args(load_in_4bit=True)) == "cpu"  # bitsandbytes' CPU backend
    assert model_options.device_map(args()) is None  # transformers' default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_options.device_map(args(load_in_4bit=True)) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert model_options.device_map(args()) == "cuda:1"  # one GPU per launched process
