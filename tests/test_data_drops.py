"""No training data dropped without telling the user (issue 24.4), and a multi-megabyte line read and tokenized in
bounded memory (issue 24.7).

Malformed rows and files mixing prompt/response rows with chat rows are refused naming the line (they used to be
skipped as "blank"); blank rows, responses truncated by ``--max-length`` and examples skipped with
``--skip-truncated`` are counted and named on stdout, in report.md and in report.json; an example whose whole
response is cut away is refused unless skipped, and nothing is written where a run is refused.
"""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import tiny_tokenizer, write_jsonl

from ssah_peft.cli import main
from ssah_peft.finetuning import Examples, read_examples
from ssah_peft.finetuning.data import training_set

CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
GOOD = {"prompt": "q", "response": "a"}
# With the character tokenizer's ChatML template a prompt costs 19 tokens besides its characters, a response 2.
MAX_LENGTH = 40
FITS = {"prompt": "q", "response": "short"}  # 20 + 7 tokens
TRUNCATED = {"prompt": "q", "response": "x" * 30}  # 20 + 32: the end of the response is cut
CUT_AWAY = {"prompt": "p" * 25, "response": "r"}  # the prompt alone takes 44 tokens
BLANK = {"prompt": " ", "response": "x"}


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, rows) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


MALFORMED = {
    "chat row in a prompt/response file": (
        lambda root: write_jsonl(root / "train.jsonl", [GOOD, GOOD, CHAT]),
        "train.jsonl:3: a chat record, but {root}/train.jsonl:1 is a prompt/response record; give one shape per file",
    ),
    "prompt/response row in a chat file": (
        lambda root: write_jsonl(root / "train.jsonl", [CHAT, GOOD]),
        "train.jsonl:2: a prompt/response record, but {root}/train.jsonl:1 is a chat record",
    ),
    "row with both shapes": (
        lambda root: write_jsonl(root / "train.jsonl", [GOOD, {**GOOD, **CHAT}]),
        "train.jsonl:2: holds both 'messages' and 'prompt'",
    ),
    "row missing its response": (
        lambda root: write_jsonl(root / "train.jsonl", [GOOD, {"prompt": "q"}]),
        "train.jsonl:2: field 'response' is missing (found: 'prompt')",
    ),
    "null response": (
        lambda root: write_jsonl(root / "train.jsonl", [GOOD, {"prompt": "q", "response": None}]),
        "train.jsonl:2: field 'response' is null",
    ),
    "row of other fields": (
        lambda root: write_jsonl(root / "train.jsonl", [GOOD, {"text": "q"}]),
        "train.jsonl:2: no 'prompt' and 'response' fields, nor 'messages' (found: 'text')",
    ),
    "CSV row missing a field": (
        lambda root: write_csv(root / "train.csv", "prompt,response\nq,a\nonly a prompt\n"),
        "train.csv:3: 1 field, the header has 2 columns (prompt, response)",
    ),
    "Parquet null": (
        lambda root: write_parquet(root / "train.parquet", [GOOD, {"prompt": None, "response": "a"}]),
        "train.parquet[1]: field 'prompt' is null",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_rows_and_mixed_files_are_refused_naming_the_line(tmp_path, case):
    make, message = MALFORMED[case]
    with pytest.raises(ValueError) as error:
        read_examples(str(make(tmp_path)))
    assert message.format(root=tmp_path) in str(error.value)


def finetune_args(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--model",
        str(checkpoint),
        "--data",
        str(data),
        "--out",
        str(out),
        "--mode",
        "lora",
        "--no-eval",
        "--max-steps",
        "1",
        "--max-length",
        str(MAX_LENGTH),
        "--no-progress",
        *extra,
    ]


def test_the_cli_refuses_a_malformed_file_before_anything_is_written(tmp_path, checkpoint, capsys):
    data = MALFORMED["CSV row missing a field"][0](tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(finetune_args(checkpoint, data, tmp_path / "run"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ssah-peft: error: ") and "train.csv:3: 1 field, the header has 2 columns" in err
    assert not (tmp_path / "run").exists()


def test_a_response_cut_away_is_refused_naming_its_line_and_nothing_is_written(tmp_path, checkpoint, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [FITS, TRUNCATED, CUT_AWAY, FITS])
    with pytest.raises(SystemExit) as exit_info:
        main(finetune_args(checkpoint, data, tmp_path / "run"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ssah-peft: error: ")
    assert f"{data}:3: max_length {MAX_LENGTH} (--max-length) leaves no token of the response" in err
    assert f"1 of 4 examples are cut so ({data}:3)" in err and "--skip-truncated" in err
    assert not (tmp_path / "run").exists()


def test_every_example_left_out_or_truncated_is_counted_and_named(tmp_path, checkpoint, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [FITS, TRUNCATED, BLANK, CUT_AWAY, FITS, TRUNCATED])
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": "how to pick a lock"}, {"prompt": "  "}])
    out = tmp_path / "run"
    safety = ["--safety-eval-data", str(harmful)]  # read and checked even with --no-eval
    assert main([*finetune_args(checkpoint, data, out, "--skip-truncated"), *safety]) == 0
    lines = [
        f"Data `{data}` (prompt/response): 6 examples read, 4 trained.",
        f"- 1 skipped, a turn of theirs blank: {data}:3",
        f"- 2 trained with the end of their response cut by --max-length {MAX_LENGTH}: {data}:2, {data}:6",
        f"- 1 skipped, --max-length {MAX_LENGTH} leaving none of their response (--skip-truncated): {data}:4",
        f"- harmful prompts of --safety-eval-data: 1 evaluated, 1 blank skipped: {harmful}:2",
    ]
    stdout = capsys.readouterr().out
    report_md = (out / "report.md").read_text(encoding="utf-8")
    for line in lines:
        assert stdout.count(line) == 2, line  # once before training, once in the printed report
        assert line in report_md, line
    assert stdout.index(lines[0]) < stdout.index("# Fine-tuning report")
    assert "1 steps on 4 examples of" in report_md
    data_report = json.loads((out / "report.json").read_text())["data"]
    assert data_report["examples_read"] == 6 and data_report["examples_trained"] == 4
    assert (data_report["skipped_blank"], data_report["skipped_blank_at"]) == (1, [f"{data}:3"])
    assert (data_report["truncated"], data_report["truncated_at"]) == (2, [f"{data}:2", f"{data}:6"])
    assert (data_report["skipped_truncated"], data_report["skipped_truncated_at"]) == (1, [f"{data}:4"])
    assert data_report["held_out"] == 0
    assert (data_report["safety_eval_skipped_blank"], data_report["safety_eval_skipped_blank_at"]) == (
        1,
        [f"{harmful}:2"],
    )


def test_held_out_examples_keep_their_lines(tmp_path):
    rows = [FITS] * 11 + [CUT_AWAY] + [FITS] * 8
    examples = read_examples(str(write_jsonl(tmp_path / "train.jsonl", rows)))
    trained, held_out = examples.hold_out(10)
    assert len(held_out) == 2 and len(trained.records) == 18
    assert trained.locations == [f"{tmp_path}/train.jsonl:{line}" for line in range(1, 21) if line % 10]
    assert trained.sha256() == Examples(examples.source, trained.records, examples.shape).sha256()
    with pytest.raises(ValueError, match=f"train.jsonl:12: max_length {MAX_LENGTH}"):
        training_set(tiny_tokenizer(), trained, MAX_LENGTH)
    kept = training_set(tiny_tokenizer(), trained, MAX_LENGTH, skip_truncated=True)
    assert len(kept.dataset) == 17 and kept.skipped == [f"{tmp_path}/train.jsonl:12"] and not kept.truncated


def test_examples_built_in_python_are_named_by_their_index():
    examples = Examples("my records", [FITS, CUT_AWAY], "prompt/response")
    with pytest.raises(ValueError, match=r"my records\[1\]: max_length 40"):
        training_set(tiny_tokenizer(), examples, MAX_LENGTH)


def test_every_example_cut_away_is_refused_even_when_skipping(tmp_path):
    examples = read_examples(str(write_jsonl(tmp_path / "train.jsonl", [CUT_AWAY, CUT_AWAY])))
    with pytest.raises(ValueError, match="cuts every example before its response: no token would be trained"):
        training_set(tiny_tokenizer(), examples, MAX_LENGTH, skip_truncated=True)


def test_a_multi_megabyte_line_is_read_and_tokenized_in_bounded_memory(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [FITS, {"prompt": "q", "response": "word " * 1_600_000}])  # 8 MB
    tokenizer = tiny_tokenizer()
    tracemalloc.start()
    try:
        examples = read_examples(str(data))
        trained = training_set(tokenizer, examples, 512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, peak
    assert [len(ids) for ids in trained.dataset["input_ids"]] == [27, 512]
    assert trained.truncated == [f"{data}:2"]


def test_blank_rows_of_csv_are_counted_not_refused(tmp_path):
    rows = [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": ""}, {"prompt": "", "response": "a"}]
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["prompt", "response"])
        writer.writeheader()
        writer.writerows(rows)
    examples = read_examples(str(tmp_path / "train.csv"))
    assert len(examples.records) == 1 and examples.blank == [f"{tmp_path}/train.csv:3", f"{tmp_path}/train.csv:4"]
