"""Outputs written atomically, headers checked against their files before anything is allocated from them, and
one-line errors where tracebacks were (issue 24, items 5 (outputs), 7 (unit-map and partial-file headers) and 8).

Full disks are simulated by an ``os.replace`` or ``os.fsync`` that fails with ENOSPC; memory is measured with
tracemalloc (what Python allocates, which is where the claims of a header used to be built).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers import model_scores, tiny_model, tiny_tokenizer
from safetensors import safe_open

from ssah_peft import UnitMap, _files, models
from ssah_peft.analysis import figures
from ssah_peft.cli import main
from ssah_peft.cli.paths import EVAL_REPORT, EVAL_REPORT_PART, check_output_dir
from ssah_peft.evaluate import write_report
from ssah_peft.scoring import merge_partial_scores

EVAL_FILES = {"report.json": EVAL_REPORT, "report.md": EVAL_REPORT_PART, "generations.jsonl": EVAL_REPORT_PART}
#: Extra Python memory a refused header may cost (issue 24, acceptance).
MEMORY_LIMIT = 100 * 2**20


def refused(capsys, argv: list[str], status: int = 1) -> str:
    """The one-line ``ssah-peft: error: ...`` of a run that must stop with ``status``, without a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ssah-peft")]
    assert len(lines) == 1 and lines[0].startswith("ssah-peft: error: "), err
    return lines[0]


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def temporary_files(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir() if _files.TEMP_INFIX in path.name]


def full_disk_at(monkeypatch, name: str) -> None:
    """Replacing a file called ``name`` fails as on a full disk (other renames work)."""
    replace = os.replace

    def failing(source, target, *args, **kwargs):
        if Path(target).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)


def rewrite_safetensors(source: Path, target: Path, edit) -> Path:
    """``target``: ``source`` with ``edit(tensors, metadata)`` applied."""
    with safe_open(str(source), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {key: f.get_tensor(key) for key in f.keys()}
    edit(tensors, metadata)
    target.write_bytes(_files.safetensors_bytes(tensors, metadata))
    return target


def peak_memory(function) -> tuple[int, BaseException]:
    """Peak Python memory while ``function()`` runs, and the exception it must raise."""
    tracemalloc.start()
    try:
        function()
    except Exception as error:  # noqa: BLE001 - returned for the test to check
        raised = error
    else:
        pytest.fail("no error was raised")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny Llama with a tokenizer, calibration pairs, a unit map and the partial score files of 2 shards."""
    root = tmp_path_factory.mktemp("robustness")
    model_dir = root / "model"
    model = tiny_model("llama", vocab_size=128).float()
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"answer {i}"}) + "\n" for i in range(4)))
    unit_map = root / "unitmap.safetensors"
    UnitMap.from_scores(model_scores(model, 1), model_scores(model, 2)).save(unit_map)
    partials = [root / f"shard{rank}.safetensors" for rank in range(2)]
    for rank, path in enumerate(partials):
        command = ["score", "--model", str(model_dir), "--safety-data", str(pairs), "--utility-data", str(pairs)]
        assert main([*command, "--no-progress", "--shard", f"{rank}/2", "--partial-out", str(path)]) == 0
    return {"model": model_dir, "pairs": pairs, "unit_map": unit_map, "partials": partials}


# ----------------------------------------------------------------------------------------------------
# Item 5: every output is written atomically; a failed write keeps the previous file and no temporary file
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_write_that_fails_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path, monkeypatch, failing):
    path = _files.write_json(tmp_path / "result.json", {"run": 1})
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, full_disk)
    with pytest.raises(OSError, match=rf"Cannot write {re.escape(str(path))} \(No space left on device\)") as error:
        _files.write_json(path, {"run": 2})
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and json.loads(before) == {"run": 1}
    assert temporary_files(tmp_path) == []


def test_a_figure_that_fails_while_rendering_keeps_the_previous_file(tmp_path, saved, monkeypatch):
    from matplotlib.figure import Figure

    unit_map = UnitMap.load(saved["unit_map"])
    png = unit_map.plot(tmp_path / "types.png")
    before = png.read_bytes()

    def broken(self, target, *args, **kwargs):  # writes half a PNG where it is told to, then fails
        if isinstance(target, (str, os.PathLike)):
            Path(target).write_bytes(before[:20])
        else:
            target.write(before[:20])
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        unit_map.plot(png)
    assert png.read_bytes() == before and [path.name for path in tmp_path.iterdir()] == ["types.png"]


def test_every_report_figure_and_table_is_written_through_write_atomic(tmp_path, saved, monkeypatch):
    written: list[Path] = []
    write_atomic = _files.write_atomic

    def recording(path, data):
        written.append(Path(path))
        write_atomic(path, data)

    monkeypatch.setattr(_files, "write_atomic", recording)
    report = {"model": "m", "adapter": None, "settings": {"max_new_tokens": 1, "batch_size": 1}, "seconds": 1.0}
    write_report(report, [{"dataset": "d", "response": "ü"}], tmp_path / "eval")
    unit_map = UnitMap.load(saved["unit_map"])
    unit_map.plot(tmp_path / "show.png")
    figures.plot_unit_types(unit_map, tmp_path / "analysis" / "unitmap.png")
    files = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    assert sorted(written) == files and len(files) == 6
    assert json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8")) == report
    assert "ü" in (tmp_path / "eval" / "generations.jsonl").read_text(encoding="utf-8")  # UTF-8, as before


def test_eval_on_a_full_disk_keeps_the_report_and_a_folder_the_next_run_accepts(saved, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    command = ["eval", "--model", str(saved["model"]), "--limit", "1", "--max-new-tokens", "2", "--no-progress"]
    command += ["--suite", "safety", "--out", str(out)]
    assert main(command) == 0
    first = contents(out)
    with monkeypatch.context() as patch:
        full_disk_at(patch, "report.md")  # report.json is replaced, then the disk is full
        message = refused(capsys, command)
    assert message == f"ssah-peft: error: Cannot write {out / 'report.md'} (No space left on device)"
    after = contents(out)
    assert temporary_files(out) == [] and after.keys() == first.keys()
    assert after["report.md"] == first["report.md"] and after["generations.jsonl"] == first["generations.jsonl"]
    assert json.loads(after["report.json"])["schema"] == json.loads(first["report.json"])["schema"]
    check_output_dir(out, "--out", EVAL_FILES)  # not refused: every file there is still ours
    # a disk full at the first file of a new folder leaves it empty, and the next run goes ahead
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        full_disk_at(patch, "report.json")
        assert "No space left on device" in refused(capsys, [*command[:-1], str(fresh)])
    assert list(fresh.iterdir()) == []
    assert main([*command[:-1], str(fresh)]) == 0
    assert sorted(contents(fresh)) == sorted(EVAL_FILES)


def test_units_show_plot_on_a_full_disk_keeps_the_previous_figure(saved, tmp_path, capsys, monkeypatch):
    png = tmp_path / "types.png"
    assert main(["units", "show", str(saved["unit_map"]), "--plot", str(png)]) == 0
    before = png.read_bytes()
    full_disk_at(monkeypatch, "types.png")
    message = refused(capsys, ["units", "show", str(saved["unit_map"]), "--plot", str(png)])
    assert message == f"ssah-peft: error: Cannot write {png} (No space left on device)"
    assert png.read_bytes() == before and before.startswith(b"\x89PNG") and temporary_files(tmp_path) == []


# ----------------------------------------------------------------------------------------------------
# Item 7: headers are checked against the file before anything is allocated from their claims
# ----------------------------------------------------------------------------------------------------


def with_layers(fingerprint: dict, num_layers: int) -> dict:
    """``fingerprint`` claiming ``num_layers`` layers, each as wide as its first."""
    widths = {kind: [per_layer[0]] * num_layers for kind, per_layer in fingerprint["widths"].items()}
    return {**fingerprint, "num_layers": num_layers, "widths": widths}


def claim_layers(num_layers: int):
    def edit(tensors, metadata):
        metadata["fingerprint"] = json.dumps(with_layers(json.loads(metadata["fingerprint"]), num_layers))

    return edit


def test_a_unit_map_header_claiming_millions_of_layers_is_refused_in_little_memory(saved, tmp_path):
    huge = rewrite_safetensors(saved["unit_map"], tmp_path / "huge.safetensors", claim_layers(2_000_000))
    peak, error = peak_memory(lambda: UnitMap.load(huge))
    assert isinstance(error, ValueError) and peak < MEMORY_LIMIT
    assert str(error).startswith(f"{huge}: metadata field 'fingerprint' is ")
    assert "characters long, more than ssah-peft writes" in str(error) and "the header is damaged" in str(error)

    # a claim small enough to parse is checked against the tensors present without listing all it promises
    many = rewrite_safetensors(saved["unit_map"], tmp_path / "many.safetensors", claim_layers(50_000))
    peak, error = peak_memory(lambda: UnitMap.load(many))
    assert isinstance(error, ValueError) and peak < MEMORY_LIMIT
    assert re.fullmatch(
        rf"{re.escape(str(many))} is not a complete unit map: tensor\(s\) types\.2\.mlp, safety\.2\.mlp, "
        r"utility\.2\.mlp, .* and 299976 more missing \(the map's fingerprint describes 50000 layers of mlp, attn\)",
        str(error),
    )


def test_a_partial_file_claiming_millions_of_shards_is_refused_in_little_memory(saved, tmp_path):
    def world_size(value: int):
        return lambda tensors, metadata: metadata.update(world_size=str(value))

    claims = [rewrite_safetensors(path, tmp_path / path.name, world_size(30_000_000)) for path in saved["partials"]]
    peak, error = peak_memory(lambda: merge_partial_scores(claims))
    assert isinstance(error, ValueError) and peak < MEMORY_LIMIT
    assert re.match(
        r"Rank\(s\) \[2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13\] and 29999986 more of 30000000 are missing", str(error)
    )
    # a rank outside the world size is a damaged header, not one more shard
    beyond = rewrite_safetensors(saved["partials"][1], tmp_path / "beyond.safetensors", world_size(1))
    with pytest.raises(
        ValueError,
        match=r"beyond\.safetensors: the header .* is damaged \(rank 1 is not in 0\.\.world_size-1, world_size 1\)",
    ):
        merge_partial_scores([saved["partials"][0], beyond])


@pytest.mark.parametrize(
    ("num_layers", "problem"),
    [
        (2_000_000, r"metadata field 'sets' is \d+ characters long, more than ssah-peft writes"),
        (50_000, r"is not a complete partial score file: tensor\(s\) safety\.state\.2\.attn, .* and \d+ more missing"),
    ],
    ids=["2M layers", "50K layers"],
)
def test_a_partial_file_header_claiming_many_layers_is_refused_in_little_memory(saved, tmp_path, num_layers, problem):
    def claim(tensors, metadata):
        sets = json.loads(metadata["sets"])
        for description in sets.values():
            description["fingerprint"] = with_layers(description["fingerprint"], num_layers)
        metadata["sets"] = json.dumps(sets)

    edited = rewrite_safetensors(saved["partials"][1], tmp_path / "edited.safetensors", claim)
    peak, error = peak_memory(lambda: merge_partial_scores([saved["partials"][0], edited]))
    assert isinstance(error, ValueError) and peak < MEMORY_LIMIT
    assert str(error).startswith(str(edited)) and re.search(problem, str(error))


# ----------------------------------------------------------------------------------------------------
# Item 8: one line naming the file and the problem where there were tracebacks or wrong messages
# ----------------------------------------------------------------------------------------------------


def _set_value(key: str, index: int, value: float):
    def edit(tensors, metadata):
        tensors[key] = tensors[key].clone()
        tensors[key][index] = value

    return edit


DAMAGED_PARTIALS = {
    "tensor missing": (
        lambda tensors, metadata: tensors.pop("safety.state.1.mlp"),
        r"is not a complete partial score file: tensor\(s\) safety\.state\.1\.mlp missing \(set 'safety' of variance "
        r"statistics, 2 layers of attn, mlp\); score this shard again",
    ),
    "one unit short": (
        lambda tensors, metadata: tensors.update({"utility.weight.0.attn": tensors["utility.weight.0.attn"][:-1]}),
        r": tensor utility\.weight\.0\.attn is float64 of shape \[31\], expected float64 of shape \[32\] \(layer 0's "
        r"attn block has 32 units\); the file is damaged",
    ),
    "state one unit short": (
        lambda tensors, metadata: tensors.update({"safety.state.1.mlp": tensors["safety.state.1.mlp"][:-2]}),
        r": tensor safety\.state\.1\.mlp is float64 of shape \[96\], expected float64 of shape \[98\]",
    ),
    "NaN": (
        _set_value("safety.state.0.attn", 5, float("nan")),
        r": tensor safety\.state\.0\.attn holds 1 non-finite value\(s\) \(NaN/inf\); the file is damaged",
    ),
    "tensor of an unknown set": (
        lambda tensors, metadata: tensors.update({"other.state.0.mlp": torch.zeros(98, dtype=torch.float64)}),
        r"holds the unexpected tensor\(s\) other\.state\.0\.mlp",
    ),
}


@pytest.mark.parametrize("damage", DAMAGED_PARTIALS)
def test_merge_scores_names_the_damaged_partial_file_and_tensor(saved, tmp_path, capsys, damage):
    edit, problem = DAMAGED_PARTIALS[damage]
    damaged = rewrite_safetensors(saved["partials"][1], tmp_path / "damaged.safetensors", edit)
    out = tmp_path / "unitmap.safetensors"
    message = refused(capsys, ["units", "merge-scores", str(saved["partials"][0]), str(damaged), "--out", str(out)])
    assert message.startswith(f"ssah-peft: error: {damaged}") and re.search(problem, message), message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["damaged.safetensors"]


def test_score_refuses_records_whose_response_max_length_cuts_away(saved, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    prompts = ["short", "word " * 40, "short", "word " * 40]
    data.write_text("".join(json.dumps({"prompt": p, "response": "a reply"}) + "\n" for p in prompts))
    out = tmp_path / "shard1.safetensors"
    command = ["score", "--model", str(saved["model"]), "--safety-data", str(data), "--utility-data"]
    command += [str(saved["pairs"]), "--max-length", "64", "--shard", "1/2", "--partial-out", str(out), "--no-progress"]
    message = refused(capsys, command)
    assert message == (
        f"ssah-peft: error: {data}: record(s) 2, 4 leave no token to score (--tokens response): --max-length 64 cuts "
        "them off within the prompt; raise --max-length, or shorten or leave out these records"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[\n  {"prompt": "q", "response": "a"}\n]\n',
            r"data\.json:1: not JSON Lines: a JSON value starts here and goes on over the next lines \(a "
            r"pretty-printed \.json file\?\); give one JSON object per line, e\.g\. jq -c '\.\[\]' ",
        ),
        (
            '{"prompt": "q", "response": "a"}\n{"prompt": "q\\ud800", "response": "a"}\n',
            r"data\.json:2: holds the escape \\ud800, half of a UTF-16 surrogate pair without its other half, "
            "which is no character",
        ),
        ('{"prompt": "q", "response": "a"}\n{"prompt": "q",\n', r"data\.json:2: not valid JSON \(Expecting"),
    ],
    ids=["pretty-printed array", "lone surrogate", "broken line"],
)
def test_data_files_that_are_not_json_lines_are_named_before_loading(
    saved, tmp_path, capsys, monkeypatch, text, problem
):
    monkeypatch.setattr(models, "load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    data = tmp_path / "data.json"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "unitmap.safetensors"
    command = ["score", "--model", str(saved["model"]), "--safety-data", str(data), "--utility-data"]
    message = refused(capsys, [*command, str(saved["pairs"]), "--out", str(out), "--no-progress"])
    assert message.startswith(f"ssah-peft: error: {data}") and re.search(problem, message), message
    assert not out.exists()
