"""One path from calibration data to a unit map, one training layer (issue 25, items 1 and 2).

The unit map: ``ssah-peft score``, the ``finetune`` job and the demo's measurements make their maps through
:func:`ssah_peft.unit_map.unit_map_from_calibration`, so every map records one description of its calibration data
(sha256 included); a sharded pass merges to the map of one pass; :meth:`UnitMap.from_scores` refuses a
``composite_fraction`` beyond the composite units. The training: ``ssah_peft.finetune`` trains as the demo does
(``tests/test_trl_training.py`` checks the trainer itself).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import pairs, tiny_chat_llama, tiny_tokenizer
from transformers import TrainerCallback

import ssah_peft
from ssah_peft.cli import main
from ssah_peft.experiments import DemoConfig, unit_map_of
from ssah_peft.scoring import calibration_data_hash, merge_partial_scores, save_partial_scores
from ssah_peft.unit_map import (
    CalibrationSet,
    CalibrationSettings,
    NoTokensToScore,
    UnitMap,
    calibration_statistics,
    unit_map_from_calibration,
)

#: What every map records about each calibration set besides where the model came from.
SCHEMA = {
    "method",
    "num_tokens",
    "num_sequences",
    "data",
    "num_examples",
    "data_sha256",
    "tokens",
    "max_length",
    "chat_template",
    "system_prompt",
}
MODEL_SOURCE = {"model", "dtype", "load_in_4bit"}
RECORDS = [
    {"prompt": "say hi", "response": "hi there"},
    {"prompt": "a much longer prompt than the other one", "response": "ok"},
    {"prompt": "count to three", "response": "one, two, three"},
]


class HeadPositions(TrainerCallback):
    """Records, for every forward during training, the positions the input embeddings and the output head see."""

    def __init__(self) -> None:
        self.inputs: list[int] = []
        self.head: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.get_input_embeddings().register_forward_hook(lambda m, a, out: self.inputs.append(out.shape[1]))
        base.get_output_embeddings().register_forward_pre_hook(lambda m, a: self.head.append(a[0].shape[1]))


def test_finetune_trains_with_the_response_only_loss_and_records_the_one_map_schema(checkpoint, train_file, tmp_path):
    positions = HeadPositions()
    result = ssah_peft.finetune(
        str(checkpoint),
        str(train_file),
        tmp_path / "run",
        callbacks=[positions],
        evaluate=False,
        calibration_samples=8,
        max_length=64,
        max_steps=3,
        save_steps=3,
        grad_accum=2,
        show_progress=False,
    )
    # 20 examples are 5 batches of 4: three steps of 2, 2 and 1 accumulated batches (the epoch ends)
    assert len(positions.head) == len(positions.inputs) == 5
    assert all(head < length for head, length in zip(positions.head, positions.inputs)), positions.__dict__
    assert result.report["steps"] == 3
    calibration = UnitMap.load(result.unit_map).calibration
    for name, source in (("safety", "safety_calibration"), ("utility", str(train_file))):
        assert set(calibration[name]) == SCHEMA | MODEL_SOURCE, name
        assert calibration[name]["data"] == source and calibration[name]["num_examples"] == 8
        assert calibration[name]["model"] == str(checkpoint) and calibration[name]["max_length"] == 512


def test_the_cli_and_the_demo_record_the_same_schema(checkpoint, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs(6)), encoding="utf-8")
    out = tmp_path / "map.safetensors"
    command = ["score", "--model", str(checkpoint), "--safety-data", str(data), "--utility-data", str(data)]
    assert main([*command, "--max-length", "64", "--out", str(out), "--no-progress"]) == 0
    cli = UnitMap.load(out).calibration["safety"]
    assert set(cli) == SCHEMA | MODEL_SOURCE and cli["data_sha256"] == calibration_data_hash(pairs(6))

    tokenizer = tiny_tokenizer()
    model = tiny_chat_llama(tokenizer, intermediate_size=64)
    config = DemoConfig.quick(tmp_path, calibration_pairs=4, max_length=320, show_progress=False)
    demo = unit_map_of(model, tokenizer, config, config.unit_fractions, half=1).calibration["utility"]
    assert set(demo) == SCHEMA | {"half"} and demo["half"] == 1 and demo["num_examples"] == 2


def test_shards_merge_to_the_map_of_one_pass_and_name_records_without_tokens(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_chat_llama(tokenizer, intermediate_size=64)
    safety, utility = CalibrationSet("safety.jsonl", pairs(5)), CalibrationSet("utility.jsonl", pairs(4, offset=10))
    settings = CalibrationSettings(max_length=64, batch_size=2)
    whole = unit_map_from_calibration(model, tokenizer, safety, utility, settings, show_progress=False)
    files = []
    for rank in range(2):
        statistics = calibration_statistics(model, tokenizer, safety, utility, settings, shard=(rank, 2))
        files.append(tmp_path / f"shard{rank}.safetensors")
        save_partial_scores(files[-1], statistics, rank=rank, world_size=2)
    merged = merge_partial_scores(files)
    assert merged["safety"].calibration_info() == whole.calibration["safety"]
    assert merged["safety"].metadata["data_sha256"] == calibration_data_hash(pairs(5))  # the whole set's
    for kind, per_layer in merged["utility"].scores.items():
        for layer, scores in enumerate(per_layer):
            torch.testing.assert_close(scores.float(), whole.utility_scores[kind][layer], rtol=1e-5, atol=0)

    cut = CalibrationSet("long.jsonl", [pairs(1)[0], {"prompt": "word " * 40, "response": "a reply"}] * 2)
    with pytest.raises(NoTokensToScore) as refused:
        calibration_statistics(model, tokenizer, cut, utility, settings, shard=(1, 2))
    assert str(refused.value) == (
        "long.jsonl: record(s) 2, 4 leave no token to score (tokens='response'): max_length 64 cuts them off within "
        "the prompt; raise max_length, or shorten or leave out these records"
    )


def test_from_scores_refuses_a_composite_fraction_beyond_the_composite_units():
    tokenizer = tiny_tokenizer()
    model = tiny_chat_llama(tokenizer, intermediate_size=64)
    statistics = calibration_statistics(
        model, tokenizer, CalibrationSet("s", pairs(3)), CalibrationSet("u", pairs(3)), show_progress=False
    )
    safety, utility = (statistics[name].finalize() for name in ("safety", "utility"))
    with pytest.raises(ValueError, match=r"composite_fraction 0.5 exceeds the share of composite units.* = 0.4"):
        UnitMap.from_scores(safety, utility, scu=0.2, ucu=0.2, ru=0.2, composite_fraction=0.5)
    unit_map = UnitMap.from_scores(safety, utility, scu=0.2, ucu=0.2, ru=0.2, composite_fraction=0.4)
    assert unit_map.composite_fraction == 0.4
