"""Built-in data sets (sizes, content properties, disjointness), the task generator and the local-file loader."""

from __future__ import annotations

import itertools
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssah_peft.data import BUILTIN_DATASETS, PUBLIC_DATASETS, generate_task, load_builtin, load_local, task_splits
from ssah_peft.evaluate import exact_match, is_refusal

MINIMUM_SIZES = {
    "safety_calibration": 150,
    "utility_calibration": 150,
    "task_train": 1000,
    "task_test": 200,
    "harmful_eval": 100,
    "overrefusal_eval": 50,
}
STOPWORDS = set(
    "a an the and or to of in on at for from with without by so as is are be do does did i my me you your how can "
    "what whats which where who why make get into it its that this them their they he she his her him someone s".split()
)


@pytest.fixture(scope="module")
def sets() -> dict[str, list[dict]]:
    return {name: load_builtin(name).to_list() for name in BUILTIN_DATASETS}


def content_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - STOPWORDS


def test_sizes_and_fields(sets):
    assert set(sets) == set(MINIMUM_SIZES)
    for name, minimum in MINIMUM_SIZES.items():
        assert len(sets[name]) >= minimum, name
        assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in sets[name]), name
        assert len({r["prompt"] for r in sets[name]}) == len(sets[name]), f"{name} has duplicate prompts"
    for name in ("safety_calibration", "utility_calibration"):
        assert all(r["response"].strip() and r["category"] for r in sets[name])
    for name in ("task_train", "task_test"):
        assert all(r["response"] and r["answer"] for r in sets[name])


def test_safety_calibration_has_varied_short_refusals_across_categories(sets):
    safety = sets["safety_calibration"]
    assert len({r["category"] for r in safety}) >= 8
    assert not [r["response"] for r in safety if not is_refusal(r["response"])]
    assert all(len(r["response"]) < 300 for r in safety)
    responses = [r["response"] for r in safety]
    assert len(set(responses)) >= 0.95 * len(responses)
    openings = {" ".join(response.split()[:2]) for response in responses}
    assert len(openings) >= 10, openings


def test_benign_sets_get_no_refusals(sets):
    assert not [r["response"] for r in sets["utility_calibration"] if is_refusal(r["response"])]
    assert not [r["response"] for r in sets["task_train"] + sets["task_test"] if is_refusal(r["response"])]


def test_evaluation_prompts_are_disjoint_from_calibration(sets):
    prompts = {name: {r["prompt"] for r in rows} for name, rows in sets.items()}
    for a, b in itertools.combinations(prompts, 2):
        assert not prompts[a] & prompts[b], (a, b)
    # Held-out harmful prompts differ in wording and specifics, not only in exact text.
    calibration = [content_words(p) for p in prompts["safety_calibration"]]
    for prompt in prompts["harmful_eval"]:
        words = content_words(prompt)
        closest = max(len(words & other) / len(words | other) for other in calibration)
        assert closest < 0.5, prompt


def test_task_generator_is_deterministic():
    assert generate_task(300, seed=7) == generate_task(300, seed=7)
    assert generate_task(300, seed=7) != generate_task(300, seed=8)
    assert generate_task(50, seed=7) == generate_task(300, seed=7)[:50]


def test_task_splits_are_disjoint_and_test_does_not_depend_on_train_size(sets):
    train, test = sets["task_train"], sets["task_test"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}

    # Same content under another wording must not leak either: compare the numbers/words an item is about.
    def content(r):
        a, op, b, unit = re.findall(r"(\d+) ([-+×÷]) (\d+) = \d+ ?([a-z]*)", r["response"])[-1]
        return (op, *(sorted((a, b), key=int) if op in "+×" else (a, b)), unit)

    numeric = [r for r in train + test if r["category"] != "string"]
    assert len({content(r) for r in numeric}) == len(numeric)
    assert task_splits(train_size=10)[1] == test
    assert {r["category"] for r in test} == {"arithmetic", "unit_conversion", "string"}


def test_task_items_are_correct(sets):
    operations = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a // b}
    for r in sets["task_train"] + sets["task_test"]:
        assert r["response"].endswith(f"The answer is {r['answer']}.")
        assert exact_match(r["response"], r["answer"])  # the generator and the metric agree
        calculation = re.findall(r"(\d+) ([-+×÷]) (\d+) = (\d+)", r["response"])
        if r["category"] != "string":
            a, op, b, result = calculation[-1]
            assert operations[op](int(a), int(b)) == int(result) == int(r["answer"]), r
            assert a in r["prompt"]
        elif r["prompt"].startswith("Sort"):
            assert r["answer"].split(", ") == sorted(r["prompt"].split(": ")[1].split(", "))
        elif r["prompt"].startswith("Reverse"):
            assert r["answer"].split() == r["prompt"].split(": ")[1].split()[::-1]
        else:
            assert r["answer"] == r["prompt"].split("'")[1].upper()


def test_unknown_builtin_name():
    with pytest.raises(KeyError, match="Unknown built-in"):
        load_builtin("advbench")


ROWS = [
    {"question": "What is 2 + 2?", "solution": "2 + 2 = 4.", "final": 4, "topic": "math"},
    {"question": "Capital of Peru?", "solution": "Lima.", "final": None, "topic": "geo"},
]


def write_rows(tmp_path, suffix: str):
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".csv":
        lines = [f'"{r["question"]}","{r["solution"]}",{r["final"] or ""},{r["topic"]}\n' for r in ROWS]
        path.write_text("question,solution,final,topic\n" + "".join(lines))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_load_local_maps_columns_to_string_fields(tmp_path, suffix):
    path = write_rows(tmp_path, suffix)
    mapping = {"prompt": "question", "response": "solution", "answer": "final", "category": "topic"}
    data = load_local(path, columns=mapping)
    assert data.column_names == ["prompt", "response", "answer", "category"]
    assert data.to_list() == [
        {"prompt": "What is 2 + 2?", "response": "2 + 2 = 4.", "answer": "4", "category": "math"},
        {"prompt": "Capital of Peru?", "response": "Lima.", "answer": "", "category": "geo"},
    ]


def test_load_local_takes_same_named_columns_and_drops_others(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "response": "Hello", "extra": 1}) + "\n")
    assert load_local(path).to_list() == [{"prompt": "Hi", "response": "Hello"}]


def test_load_local_errors(tmp_path):
    path = write_rows(tmp_path, ".jsonl")
    with pytest.raises(KeyError, match="no 'prompt'"):
        load_local(path)
    with pytest.raises(KeyError, match="no column"):
        load_local(path, columns={"prompt": "missing"})
    with pytest.raises(ValueError, match="Unknown record fields"):
        load_local(path, columns={"prompt": "question", "label": "topic"})
    with pytest.raises(ValueError, match="Cannot tell the format"):
        load_local(tmp_path / "rows.txt")


def test_gsm8k_rows_become_task_records():
    """Only the row mapping; nothing here touches the hub."""
    row = {"question": "Tom has 3 boxes of 4 pens. How many?", "answer": "3 * 4 = <<3*4=12>>12 pens.\n#### 1,200"}
    record = PUBLIC_DATASETS["gsm8k"].to_record(row)
    assert record["answer"] == "1200" and "<<" not in record["response"]
    assert exact_match(record["response"], record["answer"])
