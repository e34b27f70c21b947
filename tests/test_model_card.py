"""The model card a saved SSAH adapter carries: ``save_pretrained`` adds an SSAH section to peft's README.md."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import tiny_model, tiny_tokenizer, tiny_units
from peft import PeftConfig, get_peft_model

from ssah_peft import SSAHConfig, UnitMap, UnitScores
from ssah_peft.cli import main
from ssah_peft.fingerprint import model_fingerprint
from ssah_peft.tuner.model_card import add_safety_table

# tiny_units: per layer 6 MLP units and 11 attention units of 48 + 32, over 2 layers
NAMED, ALL = 2 * (6 + 11), 2 * (48 + 32)
TABLE_HEADER = ["| units | count | share of all units |", "|---|---:|---:|"]


def saved_card(tmp_path: Path, config: SSAHConfig, family: str = "llama") -> str:
    get_peft_model(tiny_model(family), config).save_pretrained(tmp_path)
    return (tmp_path / "README.md").read_text(encoding="utf-8")


def section(card: str, name: str = "default") -> str:
    begin, end = f'<!-- ssah-peft adapter "{name}" -->', f'<!-- /ssah-peft adapter "{name}" -->'
    assert card.count(begin) == 1 and card.count(end) == 1
    return card[card.index(begin) : card.index(end)]


def table(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(TABLE_HEADER[0])
    return lines[start : start + 6]


def test_a_protect_adapter_card_names_the_method_mode_counts_budget_and_weights(tmp_path: Path) -> None:
    card = saved_card(tmp_path, SSAHConfig(units=tiny_units(), mode="protect", r=4, alpha=8))
    assert card.startswith("---\n") and "library_name: peft" in card.split("---")[1]  # peft's card is kept
    assert "# Model Card for" in card and "### Framework versions" in card
    text = section(card)
    assert "## SSAH adapter `default`" in text
    assert "mode **protect**: a low-rank update B·A (r=4, alpha=8) of every weight of the targeted blocks" in text
    assert table(text) == [
        *TABLE_HEADER,
        f"| trained | {ALL - NAMED} | 78.75% |",
        f"| frozen | {NAMED} | 21.25% |",
        f"| protected (frozen) | {NAMED} | 21.25% |",
        f"| all units of the model | {ALL} | 100% |",
    ]
    assert "Budget: the adapter trains 78.75% of all units." in text
    assert "- target blocks: mlp, attn; layers: all; unit parts: all" in text
    assert "The units were given directly, not from a unit map." in text
    assert (
        "- the adapter was made on: 2 layers, hidden sizes [32], block widths mlp 48; attn 32; a unit is an input "
        "channel of `mlp.down_proj`, `self_attn.o_proj`" in text
    )
    assert "- a sample of 256 of its weights is stored in adapter_config.json" in text


def test_a_select_adapter_card_counts_the_selected_units_of_the_targeted_layers(tmp_path: Path) -> None:
    config = SSAHConfig(units=tiny_units(), mode="select", layers_to_transform=[1], target_blocks=["mlp"])
    text = section(saved_card(tmp_path, config, family="gpt2"))
    assert "mode **select**: a dense update of the slices of the selected units only" in text
    assert table(text) == [
        *TABLE_HEADER,
        "| trained | 6 | 3.75% |",  # the MLP units of layer 1 only
        f"| frozen | {ALL - 6} | 96.25% |",
        "| selected (trained) | 6 | 3.75% |",
        f"| all units of the model | {ALL} | 100% |",
    ]
    assert "- target blocks: mlp; layers: 1; unit parts: all" in text
    assert "a unit is an input channel of `mlp.c_proj`, `attn.c_proj`" in text


def test_saving_again_replaces_the_section_and_changes_nothing_else(tmp_path: Path) -> None:
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units=tiny_units(), mode="protect", r=4))
    model.save_pretrained(tmp_path)
    first = (tmp_path / "README.md").read_text(encoding="utf-8")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == first
    model.peft_config["default"].r = 2  # an edited config shows in the section it replaces
    model.peft_config["default"].save_pretrained(str(tmp_path))
    second = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "(r=2, alpha=32)" in section(second) and "(r=4, alpha=32)" not in second
    assert second.replace("(r=2,", "(r=4,") == first


def test_each_adapter_of_a_multi_adapter_save_has_its_own_section(tmp_path: Path) -> None:
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units=tiny_units(), mode="protect", r=4))
    model.add_adapter("second", SSAHConfig(units=tiny_units(seed=1), mode="select"))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "mode **protect**" in section(card, "default") and "mode **select**" not in section(card, "default")
    assert "mode **select**" in section(card, "second") and "## SSAH adapter `second`" in section(card, "second")
    assert not (tmp_path / "second" / "README.md").exists()  # peft's card is the save directory's only one
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_a_config_saved_on_its_own_gets_a_card_of_its_own_and_leaves_other_cards_alone(tmp_path: Path) -> None:
    unrelated = "# My project\n\nNot a peft card.\n"
    (tmp_path / "README.md").write_text(unrelated, encoding="utf-8")
    SSAHConfig(units=tiny_units(), mode="select").save_pretrained(str(tmp_path / "config"))
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == unrelated
    card = (tmp_path / "config" / "README.md").read_text(encoding="utf-8")
    text = section(card)
    assert card.startswith('<!-- ssah-peft adapter "default" -->')
    assert "Unit counts are recorded once the adapter has been applied to a model." in text
    assert "The adapter has not been applied to a model yet: no shapes or weights are recorded." in text


def unit_map_of(model: torch.nn.Module) -> UnitMap:
    """A map with random scores for ``model``, whose scores record their calibration data as scoring does."""
    fingerprint = model_fingerprint(model)
    generator = torch.Generator().manual_seed(0)

    def scores(data: str) -> UnitScores:
        values = {
            kind: tuple(torch.rand(width, generator=generator, dtype=torch.float64) for width in widths)
            for kind, widths in fingerprint["widths"].items()
        }
        metadata = {"data": data, "num_examples": 12, "data_sha256": "0f" * 32, "tokens": "response", "notes": "x" * 99}
        return UnitScores(values, "snip", 340, 12, fingerprint, metadata)

    return UnitMap.from_scores(scores("safety.jsonl"), scores("utility.jsonl"), scu=0.05, ucu=0.1, ru=0.2)


def test_a_config_from_a_unit_map_records_and_shows_how_the_map_was_made(tmp_path: Path) -> None:
    model = tiny_model("llama")
    unit_map = unit_map_of(model)
    config = SSAHConfig(units=unit_map, mode="protect", r=4)
    calibration = {"method": "snip", "data_sha256": "0f" * 32, "num_examples": 12, "tokens": "response"}
    assert config.unit_map_settings == {
        "classification": {"scu": 0.05, "ucu": 0.1, "ru": 0.2, "standardize": False, "ranking": "global"},
        "composite_fraction": 0.0,
        "calibration": {
            "safety": {**calibration, "data": "safety.jsonl", "num_tokens": 340},
            "utility": {**calibration, "data": "utility.jsonl", "num_tokens": 340},
        },
    }
    get_peft_model(model, config).save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert stored["unit_map_settings"] == config.unit_map_settings
    assert PeftConfig.from_pretrained(tmp_path).unit_map_settings == config.unit_map_settings
    text = section((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert (
        "- classification: scu=0.05, ucu=0.1, ru=0.2, standardize=False, ranking=global; composite fraction 0" in text
    )
    assert (
        "- safety scores: method=snip, data=safety.jsonl, num_examples=12, data_sha256=" + "0f" * 32 + ", "
        "tokens=response, num_tokens=340" in text
    )
    assert "- utility scores: method=snip, data=utility.jsonl" in text
    assert (
        "- the unit map was scored on: model_type='llama', 2 layers, hidden sizes [32], block widths mlp 48; attn 32"
        in text
    )
    protected = sum(len(indices) for blocks in config.units.values() for indices in blocks.values())
    assert f"| protected (frozen) | {protected} |" in text
    sample = model_fingerprint(model)["weight_sample"]["weights"][0]["values"]
    assert repr(sample[0]) not in text and "x" * 99 not in text  # neither weights nor free-form notes are dumped


def test_the_safety_table_of_a_finetune_job_is_added_once_and_replaced(tmp_path: Path) -> None:
    get_peft_model(tiny_model("llama"), SSAHConfig(units=tiny_units())).save_pretrained(tmp_path)
    before = (tmp_path / "README.md").read_text(encoding="utf-8")
    first = ["| measure | before | after |", "|---|---:|---:|", "| attack success rate ↓ (n=4) | 50% | 25% |"]
    add_safety_table(tmp_path, first)
    add_safety_table(tmp_path, [*first[:2], "| attack success rate ↓ (n=4) | 50% | 0% |"])
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert card.startswith(before.rstrip())  # the adapter's and peft's sections as they were
    assert card.count("## Safety before and after") == 1
    assert card.rstrip().endswith(
        "## Safety before and after\n\n| measure | before | after |\n|---|---:|---:|\n"
        "| attack success rate ↓ (n=4) | 50% | 0% |\n<!-- /ssah-peft safety -->"
    )


def test_units_chosen_from_a_map_by_other_rules_record_the_map_on_request(tmp_path: Path) -> None:
    model = tiny_model("llama")
    unit_map = unit_map_of(model)
    from_map = SSAHConfig(units=unit_map, mode="select")
    config = SSAHConfig(units=unit_map.units_of("RU"), mode="select")  # as a fine-tuning method's selector gives them
    assert config.unit_map_settings is None and config.unit_map_fingerprint is None
    config.record_unit_map(unit_map)
    assert config.unit_map_settings == from_map.unit_map_settings
    assert config.unit_map_fingerprint == from_map.unit_map_fingerprint
    text = section(saved_card(tmp_path, config))
    assert "- classification: scu=0.05, ucu=0.1, ru=0.2" in text and "- the unit map was scored on: " in text


def test_an_adapter_made_by_finetune_carries_its_safety_table(tmp_path: Path) -> None:
    model_path, data, out = tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "run"
    tiny_model("llama", vocab_size=128).save_pretrained(model_path)
    tiny_tokenizer().save_pretrained(model_path)
    records = [{"prompt": f"What is {i} plus one?", "response": f"It is {i + 1}."} for i in range(20)]
    data.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    fast = ["--calibration-samples", "8", "--max-length", "64", "--max-steps", "2", "--no-progress"]
    evaluation = ["--eval-limit", "2", "--max-new-tokens", "2"]
    args = ["finetune", "--model", str(model_path), "--data", str(data), "--out", str(out), "--mode", "protect"]
    assert main([*args, *fast, *evaluation]) == 0
    card = (out / "adapter" / "README.md").read_text(encoding="utf-8")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "mode **protect**" in section(card)
    assert "The units were given directly" not in card  # the job's map is recorded with the adapter
    stored = json.loads((out / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert stored["unit_map_settings"] and stored["unit_map_fingerprint"]["num_layers"] == 2
    safety = card[card.index("<!-- ssah-peft safety -->") : card.index("<!-- /ssah-peft safety -->")]
    table_lines = [line for line in safety.splitlines() if line.startswith("|")]
    assert [line.split(" |")[0] for line in table_lines] == [
        "| measure",
        "|---|---:|---:|",
        "| attack success rate ↓ (n=2)",
        "| over-refusal ↓ (n=2)",
        "| perplexity ↓ (2 texts)",
    ]
    assert all(line in report.splitlines() for line in table_lines)  # the report's own table, row for row
