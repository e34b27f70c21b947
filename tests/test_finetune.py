"""`ssah-peft finetune` / `ssah_peft.finetune` (issue 15): a protect and a select run end to end through the CLI,
the adapter reloading in a fresh process with its update confined, resume after an interruption ending with the
same adapter, each bad input refused with its own message before anything is written, and chat records giving the
same tokens as prompt/response columns."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import Interrupt, StopAfterSave, pairs, tiny_model, tiny_tokenizer, write_jsonl
from safetensors.torch import load_file

import ssah_peft
from ssah_peft.cli import main
from ssah_peft.finetuning import read_examples
from ssah_peft.training import sft_dataset

TESTS = Path(__file__).resolve().parent
# small and fast: few calibration pairs, short examples, four steps
FAST = ["--calibration-samples", "8", "--max-length", "64", "--max-steps", "4", "--save-steps", "2", "--no-progress"]


def snapshot(root: Path) -> dict[str, bytes]:
    return (
        {str(p): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))} if root.exists() else {}
    )


RELOAD = """
import sys
sys.path.insert(0, {tests!r})
import torch
from helpers import assert_update_confined
from peft import PeftModel
from transformers import AutoModelForCausalLM
from ssah_peft import UnitMap
from ssah_peft.units import union_units

base = AutoModelForCausalLM.from_pretrained({checkpoint!r})
model = PeftModel.from_pretrained(base, {adapter!r})
assert_update_confined(model, {mode!r})
unit_map = UnitMap.load({unit_map!r})
expected = union_units(*(unit_map.units_of(t) for t in {types!r}))
assert union_units(model.peft_config["default"].units) == expected
deltas = [p for n, p in model.named_parameters() if "ssah" in n]
assert deltas and any(bool(p.detach().abs().sum() > 0) for p in deltas), "nothing trained"
print("reloaded ok")
"""


@pytest.mark.parametrize("mode", ["protect", "select"])
def test_end_to_end_through_the_cli_and_reload_in_a_fresh_process(tmp_path, checkpoint, train_file, mode, capsys):
    out = tmp_path / "run"
    evaluation = ["--eval-limit", "2", "--max-new-tokens", "2"] if mode == "protect" else ["--no-eval"]
    args = ["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(out), "--mode", mode]
    assert main([*args, *FAST, *evaluation]) == 0
    assert "# Fine-tuning report" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"adapter", "unitmap.safetensors", "checkpoints", "report.md", "report.json", "settings.json"} <= names
    assert not any(name.startswith(".") for name in names)  # no staging folder or temporary file left
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["mode"] == mode and len(report["loss_curve"]) == 4
    assert report["trainable_parameters"] > 0 and report["adapter_bytes"] > 0 and report["wall_seconds"] > 0
    assert report["command"].startswith("ssah-peft finetune --model") and "--max-steps 4" in report["command"]
    if mode == "protect":
        assert report["method"] == "ssah_protect_all_cu" and report["unit_types"] == ["SCU", "CU"]
        for stage in ("before", "after"):
            asr = report[stage]["asr"]
            assert asr["n"] == 2 and 0 <= asr["interval95"][0] <= asr["rate"] <= asr["interval95"][1] <= 1
            assert report[stage]["overrefusal"]["n"] == 2 and report[stage]["perplexity"]["texts"] == 2
        assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "attack success rate" in (out / "report.md").read_text()
        assert report["data"]["examples_trained"] == 18  # every 10th example held out for perplexity
    else:
        assert report["method"] == "ssah_select" and report["before"] is None and report["after"] is None
        assert report["data"]["examples_trained"] == 20
    types = ["SCU", "CU"] if mode == "protect" else ["RU"]
    script = RELOAD.format(
        tests=str(TESTS),
        checkpoint=str(checkpoint),
        adapter=str(out / "adapter"),
        mode=mode,
        unit_map=str(out / "unitmap.safetensors"),
        types=types,
    )
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded ok" in done.stdout


def test_an_interrupted_run_resumed_ends_with_the_same_adapter(tmp_path, checkpoint, train_file):
    options = dict(calibration_samples=8, max_length=64, max_steps=4, save_steps=2, evaluate=False, show_progress=False)
    whole = ssah_peft.finetune(str(checkpoint), str(train_file), tmp_path / "whole", **options)
    assert whole.report["steps"] == 4
    with pytest.raises(Interrupt):
        ssah_peft.finetune(str(checkpoint), str(train_file), tmp_path / "cut", callbacks=[StopAfterSave(2)], **options)
    assert not (tmp_path / "cut" / "adapter").exists()
    # the same settings without --resume are refused, with --resume the run continues from step 2
    args = ["finetune", "--model", str(checkpoint), "--data", str(train_file), "--out", str(tmp_path / "cut")]
    with pytest.raises(SystemExit):
        main([*args, *FAST, "--no-eval"])
    assert main([*args, *FAST, "--no-eval", "--resume"]) == 0
    resumed = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert resumed["steps"] == 4 and [e["step"] for e in resumed["loss_curve"]] == [1, 2, 3, 4]
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed adapter differs"
    assert any(a[k].float().abs().sum() > 0 for k in a if "delta" in k or "lora" in k or "B" in k)


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ----------------------------------------------------------------------------------------------------


def _no_template_checkpoint(root: Path) -> Path:
    path = root / "no-template"
    tiny_model("llama", vocab_size=128).float().save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return path


def _other_unit_map(root: Path, checkpoint: Path) -> Path:
    import torch

    from ssah_peft import UnitMap, UnitScores
    from ssah_peft.scoring import model_fingerprint

    other = tiny_model("llama", vocab_size=128, intermediate_size=64)
    fingerprint = model_fingerprint(other)
    scores = {k: tuple(torch.rand(w, dtype=torch.float64) for w in ws) for k, ws in fingerprint["widths"].items()}
    s = UnitScores(scores=scores, method="variance", num_tokens=1, num_sequences=1, fingerprint=fingerprint)
    path = root / "other.safetensors"
    UnitMap.from_scores(s, s).save(path)
    return path


BAD_INPUTS = {
    "misnamed columns": (
        lambda root: write_jsonl(root / "train.jsonl", [{"instruction": "a", "output": "b"}]),
        [],
        "columns found: 'instruction', 'output'",
    ),
    "empty data": (lambda root: write_jsonl(root / "train.jsonl", []), [], "holds no examples"),
    "all blank": (
        lambda root: write_jsonl(
            root / "train.jsonl", [{"prompt": " ", "response": "x"}, {"prompt": "q", "response": ""}]
        ),
        [],
        "all 2 examples have a blank prompt or response",
    ),
    "malformed line": (
        lambda root: (
            (root / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": oops}\n')
            and root / "train.jsonl"
        ),
        [],
        "train.jsonl:3: not valid JSON",
    ),
    "not utf-8": (
        lambda root: (
            (root / "train.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
            and root / "train.jsonl"
        ),
        [],
        "train.jsonl:2: not UTF-8",
    ),
    "csv without the columns": (
        lambda root: (root / "train.csv").write_text("question,answer\nq,a\n") and root / "train.csv",
        [],
        "columns found: 'question', 'answer'",
    ),
    "chat turns out of turn": (
        lambda root: write_jsonl(root / "train.jsonl", [{"messages": [{"role": "user", "content": "a"}] * 3}]),
        [],
        "(roles found: user, user, user)",
    ),
    "chat ending with the user": (
        lambda root: write_jsonl(
            root / "train.jsonl",
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2}]
            + [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}],
        ),
        [],
        "train.jsonl:2: expected 'messages' to be [system?, user, assistant, (user, assistant)...] turns",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_data_is_refused_before_anything_is_written(tmp_path, checkpoint, case, capsys):
    make, extra, message = BAD_INPUTS[case]
    data = make(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(checkpoint), "--data", str(data), "--out", str(out), *FAST, *extra])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ssah-peft: error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_bad_model_unit_map_and_run_folder_are_refused(tmp_path, checkpoint, train_file, capsys):
    def refused(args, message, out):
        before = snapshot(out)
        with pytest.raises(SystemExit):
            main(["finetune", "--data", str(train_file), "--out", str(out), *FAST, *args])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loader's progress bars
        assert err.startswith("ssah-peft: error: ") and message in err, err
        assert snapshot(out) == before

    no_template = _no_template_checkpoint(tmp_path)
    refused(["--model", str(no_template)], "no chat template", tmp_path / "a")
    refused(["--model", str(no_template)], "--chat-template FILE", tmp_path / "a")
    other = _other_unit_map(tmp_path, checkpoint)
    refused(["--model", str(checkpoint), "--unit-map", str(other)], "does not fit model", tmp_path / "b")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(["--model", str(checkpoint)], "not empty and holds no ssah-peft run", foreign)
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / "settings.json").write_text(json.dumps({"model": "elsewhere", "mode": "select"}))
    refused(["--model", str(checkpoint)], "holds a run of other settings", other_run)
    refused(["--model", str(checkpoint), "--resume"], "holds no run to resume", tmp_path / "c")
    refused(
        ["--model", str(checkpoint), "--mode", "lora", "--protect", "SCU"],
        "--protect is for --mode protect",
        tmp_path / "d",
    )
    refused(["--model", str(checkpoint), "--protect", "XYZ"], "unknown unit type 'XYZ'", tmp_path / "e")


# ----------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------


def test_chat_records_csv_parquet_and_prompt_response_give_the_same_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**r, "system": "Be brief."} if i % 2 else r for i, r in enumerate(pairs(6))]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": ([{"role": "system", "content": r["system"]}] if "system" in r else [])
                + [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
            }
            for r in rows
        ],
    )
    csv_file = tmp_path / "renamed.csv"
    import csv

    with open(csv_file, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["question", "answer", "system"])
        writer.writeheader()
        writer.writerows(
            {"question": r["prompt"], "answer": r["response"], "system": r.get("system", "")} for r in rows
        )
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, system=r.get("system")) for r in rows]), parquet)

    tokenizer = tiny_tokenizer()
    reference = read_examples(str(plain))
    assert reference.shape == "prompt/response" and len(reference.records) == 6
    expected = sft_dataset(tokenizer, reference.records, 256).to_dict()
    assert any(label != -100 for label in expected["labels"][0]) and any(
        label == -100 for label in expected["labels"][0]
    )
    for source, columns in (
        (chat, {}),
        (csv_file, dict(prompt_column="question", response_column="answer")),
        (parquet, {}),
    ):
        examples = read_examples(str(source), **columns)
        assert examples.records == reference.records, source
        assert sft_dataset(tokenizer, examples.records, 256).to_dict() == expected, source
    assert read_examples(str(chat)).shape == "chat"
