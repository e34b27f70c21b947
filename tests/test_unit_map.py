"""Unit maps: classification rule, planted units recovered from real scores, unit sets, file, comparisons."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from ssah_peft import UNIT_TYPES, SSAHConfig, UnitMap, UnitScores, score_units
from ssah_peft.scoring import model_fingerprint
from ssah_peft.unit_map import DEFAULT_PROPORTIONS
from ssah_peft.units import union_units

# ----------------------------------------------------------------------------------------------------
# A tiny llama with planted units
# ----------------------------------------------------------------------------------------------------

VOCAB, HIDDEN, INTERMEDIATE, HEAD_DIM = 64, 64, 128, 16
SAFETY_TOKENS, UTILITY_TOKENS, NEUTRAL_TOKENS = range(10, 20), range(20, 30), range(30, 64)
SAFETY_DIM, UTILITY_DIM = 0, 1  # residual-stream features: only safety / utility tokens carry them
FEATURE_DIMS = 8  # no layer writes into dims 0..7, so every layer reads the features unchanged

# Per layer: MLP neurons and attention channels of each type. An attention channel h*HEAD_DIM + d reads value row
# (h // 2)*HEAD_DIM + d (2 query heads per kv head), so a planted value row plants the channel in both heads.
PLANTED = {
    0: {
        "SCU": {"mlp": [3, 40, 77], "attn": [3, 19]},
        "UCU": {"mlp": [5, 6, 90, 101], "attn": [37, 53]},
        "dead": {"mlp": [12, 13, 14]},  # zero input rows: the activation is always 0
        "RU": {"mlp": [20, 21, 22], "attn": [10, 11]},  # zero columns of the output projection
    },
    1: {
        "SCU": {"mlp": [50, 51, 127], "attn": [40, 56]},
        "UCU": {"mlp": [0, 60, 61, 62], "attn": [7, 23]},
        "dead": {"mlp": [70, 71, 72]},
        "RU": {"mlp": [80, 81, 82], "attn": [60, 61]},
    },
}


def planted_units(unit_type: str) -> dict[str, dict[str, list[int]]]:
    def of(layer: dict, kind: str) -> list[int]:
        types = ("RU", "dead") if unit_type == "RU" else (unit_type,)
        return sorted(i for t in types for i in layer.get(t, {}).get(kind, []))

    return {str(layer): {kind: of(units, kind) for kind in ("mlp", "attn")} for layer, units in PLANTED.items()}


def planted_llama() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(0)

    def noise(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    with torch.no_grad():
        # topical tokens carry only their feature, neutral tokens only random shared features
        embedding = torch.zeros(VOCAB, HIDDEN)
        embedding[list(NEUTRAL_TOKENS), FEATURE_DIMS:] = noise(len(NEUTRAL_TOKENS), HIDDEN - FEATURE_DIMS, std=0.1)
        embedding[list(SAFETY_TOKENS), SAFETY_DIM] = 1.0
        embedding[list(UTILITY_TOKENS), UTILITY_DIM] = 1.0
        model.model.embed_tokens.weight.copy_(embedding)
        for index, layer in enumerate(model.model.layers):
            planted = PLANTED[index]
            mlp, attention = layer.mlp, layer.self_attn
            # composite units read the shared (neutral) features of every token
            for linear in (mlp.gate_proj, mlp.up_proj, attention.v_proj):
                linear.weight.zero_()
                linear.weight[:, FEATURE_DIMS:] = noise(linear.weight.shape[0], HIDDEN - FEATURE_DIMS, std=0.3)
            for linear in (mlp.down_proj, attention.o_proj):
                linear.weight.copy_(noise(*linear.weight.shape, std=0.001))  # small writes keep the features dominant
                linear.weight[:FEATURE_DIMS] = 0.0
            # planted units read only their topic's feature (a value row feeds a channel in both query heads)
            for unit_type, feature in (("SCU", SAFETY_DIM), ("UCU", UTILITY_DIM)):
                for neuron in planted[unit_type]["mlp"]:
                    for linear in (mlp.gate_proj, mlp.up_proj):
                        linear.weight[neuron] = 0.0
                        linear.weight[neuron, feature] = 1.0
                for channel in planted[unit_type]["attn"]:
                    head, dim = divmod(channel, HEAD_DIM)
                    row = (head // 2) * HEAD_DIM + dim
                    attention.v_proj.weight[row] = 0.0
                    attention.v_proj.weight[row, feature] = 6.0
            for neuron in planted["dead"]["mlp"]:
                mlp.gate_proj.weight[neuron] = 0.0
                mlp.up_proj.weight[neuron] = 0.0
            mlp.down_proj.weight[:, planted["RU"]["mlp"]] = 0.0
            attention.o_proj.weight[:, planted["RU"]["attn"]] = 0.0
    return model


def token_batches(topic: range, seed: int, count: int = 12, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Sequences mixing tokens of one topic with neutral tokens, right-padded, every real token scored."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count // batch_size):
        lengths = torch.randint(6, 16, (batch_size,), generator=generator)
        input_ids = torch.zeros(batch_size, int(lengths.max()), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, length in enumerate(lengths.tolist()):
            topical = torch.rand(length, generator=generator) < 0.5
            topic_ids = torch.randint(topic.start, topic.stop, (length,), generator=generator)
            neutral_ids = torch.randint(NEUTRAL_TOKENS.start, NEUTRAL_TOKENS.stop, (length,), generator=generator)
            input_ids[row, :length] = torch.where(topical, topic_ids, neutral_ids)
            attention_mask[row, :length] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


@pytest.fixture(scope="module")
def planted_scores() -> tuple[torch.nn.Module, UnitScores, UnitScores]:
    model = planted_llama()
    safety = score_units(model, token_batches(SAFETY_TOKENS, seed=1), show_progress_bar=False)
    utility = score_units(model, token_batches(UTILITY_TOKENS, seed=2), show_progress_bar=False)
    return model, safety, utility


def planted_fractions() -> dict[str, float]:
    total = 2 * (INTERMEDIATE + HIDDEN)
    count = {t: sum(len(i) for blocks in planted_units(t).values() for i in blocks.values()) for t in PLANTED[0]}
    return {"scu": count["SCU"] / total, "ucu": count["UCU"] / total, "ru": count["RU"] / total}


def test_planted_units_are_recovered_exactly(planted_scores):
    model, safety, utility = planted_scores
    unit_map = UnitMap.from_scores(safety, utility, **planted_fractions())
    for unit_type in ("SCU", "UCU", "RU"):
        assert unit_map.units_of(unit_type) == planted_units(unit_type), unit_type
    # redundant units have (near-)zero scores: zero columns or constant activations
    ru = unit_map.units_of("RU")
    for layer, blocks in ru.items():
        for kind, indices in blocks.items():
            for scores in (safety, utility):
                assert scores[int(layer), kind][indices].max() <= 1e-12
    unit_map.check_model(model)
    assert SSAHConfig(units=unit_map, mode="select").units == planted_units("RU")
    assert SSAHConfig(units=unit_map, mode="protect").units == planted_units("SCU")


def test_planted_units_survive_standardisation_and_per_layer_ranking(planted_scores):
    _, safety, utility = planted_scores
    # with these fractions every block's share of planted SCU and UCU rounds to its planted count
    unit_map = UnitMap.from_scores(safety, utility, standardize=True, ranking="per_layer", **planted_fractions())
    for unit_type in ("SCU", "UCU"):
        assert unit_map.units_of(unit_type) == planted_units(unit_type), unit_type


# ----------------------------------------------------------------------------------------------------
# The classification rule on hand-made scores
# ----------------------------------------------------------------------------------------------------


def fingerprint(widths: dict[str, list[int]]) -> dict:
    return {"model_type": "llama", "num_layers": len(widths["mlp"]), "hidden_sizes": [8], "widths": widths}


def make_scores(values: dict[str, list[list[float]]], method: str = "variance") -> UnitScores:
    widths = {kind: [len(v) for v in layers] for kind, layers in values.items()}
    return UnitScores(
        scores={kind: tuple(torch.tensor(v, dtype=torch.float64) for v in layers) for kind, layers in values.items()},
        method=method,
        num_tokens=100,
        num_sequences=10,
        fingerprint=fingerprint(widths),
    )


def random_scores(seed: int, widths=(40, 24), layers: int = 3, scale_layer: float = 1.0) -> UnitScores:
    generator = torch.Generator().manual_seed(seed)
    values = {
        kind: [
            (torch.rand(width, generator=generator) * (scale_layer if layer == layers - 1 else 1.0)).tolist()
            for layer in range(layers)
        ]
        for kind, width in zip(("mlp", "attn"), widths)
    }
    return make_scores(values)


def test_sign_convention_scu_is_safety_minus_utility_largest():
    # unit:        0    1    2    3    4    5    6    7    8    9
    safety = [[0.0, 9.0, 5.0, 5.0, 1.0, 4.0, 5.0, 0.1, 6.0, 3.0]]
    utility = [[0.0, 1.0, 5.0, 9.0, 1.0, 4.0, 5.0, 0.1, 2.0, 8.0]]
    unit_map = UnitMap.from_scores(
        make_scores({"mlp": safety, "attn": [[1.0]]}),
        make_scores({"mlp": utility, "attn": [[1.0]]}),
        scu=2 / 11,
        ucu=2 / 11,
        ru=2 / 11,
    )
    # RU: smallest I_S + I_U (units 0 and 7); SCU: largest I_S − I_U (1: +8, 8: +4); UCU: smallest (3: −4, 9: −5)
    assert unit_map.units_of("RU") == {"0": {"mlp": [0, 7], "attn": []}}
    assert unit_map.units_of("SCU") == {"0": {"mlp": [1, 8], "attn": []}}
    assert unit_map.units_of("UCU") == {"0": {"mlp": [3, 9], "attn": []}}
    assert unit_map.units_of("CU") == {"0": {"mlp": [2, 4, 5, 6], "attn": [0]}}


def brute_force_types(safety: torch.Tensor, utility: torch.Tensor, scu: float, ucu: float, ru: float) -> list[str]:
    """The rule written with Python sorting over (value, index) tuples."""
    n = len(safety)
    count = {k: int(v * n + 0.5) for k, v in (("scu", scu), ("ucu", ucu), ("ru", ru))}
    types = ["CU"] * n
    for i in sorted(range(n), key=lambda i: (float(safety[i] + utility[i]), i))[: count["ru"]]:
        types[i] = "RU"
    rest = sorted((i for i in range(n) if types[i] == "CU"), key=lambda i: (-float(safety[i] - utility[i]), i))
    for i in rest[: count["scu"]]:
        types[i] = "SCU"
    for i in rest[len(rest) - count["ucu"] :]:
        types[i] = "UCU"
    return types


def flat_types(unit_map: UnitMap) -> list[str]:
    return [
        UNIT_TYPES[int(c)]
        for layer in range(unit_map.num_layers)
        for kind in unit_map.kinds
        for c in unit_map.types[kind][layer]
    ]


def flat_scores(scores: UnitScores) -> torch.Tensor:
    return torch.cat(
        [scores[layer, kind].float().double() for layer in range(scores.num_layers) for kind in scores.kinds]
    )


def test_global_ranking_matches_a_brute_force_classification():
    safety, utility = random_scores(1), random_scores(2)
    unit_map = UnitMap.from_scores(safety, utility)  # the paper's default proportions
    expected = brute_force_types(flat_scores(safety), flat_scores(utility), 0.013, 0.133, 0.148)
    assert flat_types(unit_map) == expected
    total = len(expected)
    assert sum(t == "SCU" for t in expected) == round(0.013 * total)


def test_per_layer_ranking_classifies_each_block_alone():
    safety, utility = random_scores(3), random_scores(4)
    unit_map = UnitMap.from_scores(safety, utility, scu=0.1, ucu=0.2, ru=0.25, ranking="per_layer")
    for layer in range(3):
        for kind in ("mlp", "attn"):
            expected = brute_force_types(safety[layer, kind].float(), utility[layer, kind].float(), 0.1, 0.2, 0.25)
            assert [UNIT_TYPES[int(c)] for c in unit_map.types[kind][layer]] == expected


def test_standardisation_removes_per_layer_scale():
    safety, utility = random_scores(5), random_scores(6)
    scaled_safety, scaled_utility = (random_scores(seed, scale_layer=1000.0) for seed in (5, 6))
    raw = UnitMap.from_scores(scaled_safety, scaled_utility, scu=0.1, ucu=0.1, ru=0.2)
    # without standardisation the large layer holds no RU at all ...
    assert all(not indices for indices in raw.units_of("RU")["2"].values())
    # ... with it, scaling a layer changes nothing
    standardized = UnitMap.from_scores(safety, utility, scu=0.1, ucu=0.1, ru=0.2, standardize=True)
    scaled = UnitMap.from_scores(scaled_safety, scaled_utility, scu=0.1, ucu=0.1, ru=0.2, standardize=True)
    assert flat_types(standardized) == flat_types(scaled)
    assert any(standardized.units_of("RU")["2"].values())


def test_top_composite_continues_the_safety_ranking_into_cu():
    safety, utility = random_scores(7), random_scores(8)
    unit_map = UnitMap.from_scores(safety, utility, scu=0.05, ucu=0.1, ru=0.1)
    difference = flat_scores(safety) - flat_scores(utility)
    types = flat_types(unit_map)
    top = unit_map.top_composite(0.06)
    chosen = set(_offsets(unit_map, top))
    assert len(chosen) == round(0.06 * len(types)) and all(types[i] == "CU" for i in chosen)
    lowest_chosen = min(difference[i] for i in chosen)
    assert all(difference[i] <= lowest_chosen for i, t in enumerate(types) if t == "CU" and i not in chosen)
    assert all(difference[i] >= lowest_chosen for i, t in enumerate(types) if t == "SCU")
    # protect mode: SCU plus the configured composite fraction
    assert unit_map.config_units("protect") == unit_map.units_of("SCU")
    unit_map.composite_fraction = 0.06
    assert set(_offsets(unit_map, unit_map.config_units("protect"))) == chosen | set(
        _offsets(unit_map, unit_map.units_of("SCU"))
    )
    assert unit_map.config_units("select") == unit_map.units_of("RU")
    with pytest.raises(ValueError, match=r"needs \d+ CU"):
        unit_map.top_composite(0.9)


def _offsets(unit_map: UnitMap, units: dict) -> list[int]:
    """Flat positions (layer by layer, mlp then attn) of the units of a units dict."""
    offsets, start = [], 0
    for layer in range(unit_map.num_layers):
        for kind in unit_map.kinds:
            offsets += [start + i for i in units[str(layer)][kind]]
            start += unit_map.types[kind][layer].numel()
    return offsets


def test_invalid_inputs_are_rejected():
    safety = random_scores(1)
    with pytest.raises(ValueError, match="different models"):
        UnitMap.from_scores(safety, random_scores(2, widths=(40, 20)))
    with pytest.raises(ValueError, match="method"):
        UnitMap.from_scores(
            safety, make_scores({k: [t.tolist() for t in v] for k, v in safety.scores.items()}, "wanda")
        )
    with pytest.raises(ValueError, match="exceeds all units"):
        UnitMap.from_scores(safety, random_scores(2), scu=0.5, ucu=0.4, ru=0.2)
    with pytest.raises(ValueError, match="Unknown unit type"):
        UnitMap.from_scores(safety, random_scores(2)).units_of("XCU")


# ----------------------------------------------------------------------------------------------------
# File, model check, comparisons, reports
# ----------------------------------------------------------------------------------------------------


def test_file_round_trip(tmp_path, planted_scores):
    _, safety, utility = planted_scores
    unit_map = UnitMap.from_scores(safety, utility, standardize=True, composite_fraction=0.05)
    path = tmp_path / "map.safetensors"
    unit_map.save(path)
    loaded = UnitMap.load(path)
    for field in ("types", "safety_scores", "utility_scores"):
        mine, theirs = getattr(unit_map, field), getattr(loaded, field)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(a, b) and a.dtype == b.dtype for k in mine for a, b in zip(mine[k], theirs[k]))
    assert loaded.types["mlp"][0].dtype == torch.int8 and loaded.safety_scores["attn"][1].dtype == torch.float32
    assert loaded.fingerprint == unit_map.fingerprint
    assert loaded.settings == unit_map.settings
    assert loaded.summary() == unit_map.summary()  # a report reads the same from a cached map
    assert (
        loaded.calibration
        == unit_map.calibration
        == {"safety": safety.calibration_info(), "utility": utility.calibration_info()}
    )
    assert loaded.composite_fraction == 0.05
    assert loaded.config_units("protect") == unit_map.config_units("protect")
    assert loaded.top_composite(0.1) == unit_map.top_composite(0.1)


def test_maps_refuse_other_models_and_other_files(tmp_path, planted_scores):
    model, safety, utility = planted_scores
    unit_map = UnitMap.from_scores(safety, utility)
    wider = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "llama",
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=2 * INTERMEDIATE,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    path = tmp_path / "map.safetensors"
    unit_map.save(path)
    with pytest.raises(ValueError, match=r"computed for a model with .*'mlp': \[128, 128\].*but the model has .*256"):
        UnitMap.load(path).check_model(wider)
    other = UnitMap.from_scores(*(make_scores({"mlp": [[1.0, 2.0]], "attn": [[1.0]]}) for _ in range(2)))
    with pytest.raises(ValueError, match="different models"):
        unit_map.overlap(other)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not an ssah-peft unit map"):
        UnitMap.load(tmp_path / "weights.safetensors")
    assert model_fingerprint(model) == unit_map.fingerprint


def test_overlap_is_the_iou_of_each_type():
    first = UnitMap.from_scores(random_scores(1), random_scores(2), scu=0.1, ucu=0.1, ru=0.2)
    second = UnitMap.from_scores(random_scores(1), random_scores(3), scu=0.1, ucu=0.1, ru=0.2)
    assert first.overlap(first) == {t: 1.0 for t in UNIT_TYPES}
    overlap = first.overlap(second)
    for unit_type in UNIT_TYPES:
        a, b = (set(_offsets(m, m.units_of(unit_type))) for m in (first, second))
        assert overlap[unit_type] == pytest.approx(len(a & b) / len(a | b))
    assert overlap == second.overlap(first)


def test_migration_counts_units_moving_between_types():
    before = UnitMap.from_scores(random_scores(1), random_scores(2), scu=0.1, ucu=0.1, ru=0.2)
    after = UnitMap.from_scores(random_scores(1), random_scores(3), scu=0.1, ucu=0.1, ru=0.2)
    migration = before.migration(after)
    types_before, types_after = flat_types(before), flat_types(after)
    for a in UNIT_TYPES:
        for b in UNIT_TYPES:
            expected = sum(x == a and y == b for x, y in zip(types_before, types_after))
            assert migration.moved(a, b) == expected
            assert migration.percent[UNIT_TYPES.index(a), UNIT_TYPES.index(b)] == pytest.approx(
                100 * expected / len(types_before)
            )
    assert migration.total == len(types_before)
    assert torch.equal(
        before.migration(before).counts.diagonal(), torch.tensor([types_before.count(t) for t in UNIT_TYPES])
    )
    table = migration.table().splitlines()
    assert table[0].split() == ["before", "\\", "after", "SCU", "UCU", "CU", "RU"]
    assert table[1].split()[:3] == ["SCU", str(migration.moved("SCU", "SCU")), f"({migration.percent[1, 1]:.2f}%)"]


def test_summary_and_plot(tmp_path, planted_scores):
    _, safety, utility = planted_scores
    unit_map = UnitMap.from_scores(safety, utility, **planted_fractions())
    lines = unit_map.summary().splitlines()
    header = lines[1].split()
    assert header == ["layer"] + [f"{k}:{t}" for k in ("mlp", "attn") for t in ("SCU", "UCU", "CU", "RU")]
    for layer in range(2):
        row = dict(zip(header, lines[2 + layer].split()))
        for kind in ("mlp", "attn"):
            for unit_type in ("SCU", "UCU", "RU"):
                assert int(row[f"{kind}:{unit_type}"]) == len(planted_units(unit_type)[str(layer)][kind])
    total = dict(zip(header, lines[4].split()))
    assert total["layer"] == "total" and int(total["mlp:CU"]) == sum(
        int(dict(zip(header, lines[2 + layer].split()))["mlp:CU"]) for layer in range(2)
    )
    assert lines[-1].startswith(f"all {2 * (INTERMEDIATE + HIDDEN)} units: SCU 10 (2.6%)")
    png = unit_map.plot(tmp_path / "types.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# A saved map is checked against its own metadata on load
# ----------------------------------------------------------------------------------------------------


def edited_copy(source: Path, target: Path, edit) -> Path:
    """``target``: the map file ``source`` after ``edit(tensors, metadata)``, written with plain safetensors."""
    with safe_open(source, "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(source)
    edit(tensors, metadata)
    save_file(tensors, target, metadata=metadata)
    return target


def _set(mapping: dict, key: str, value) -> None:
    mapping[key] = value


def _edit_json(metadata: dict, field: str, change) -> None:
    value = json.loads(metadata[field])
    change(value)
    metadata[field] = json.dumps(value)


def _with_value(tensor: torch.Tensor, index: int, value) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


# name -> (edit of (tensors, metadata), regex of the problem the error must name); the map has 3 layers of
# 40 MLP and 24 attention units
CORRUPTIONS = {
    "tensor removed": (
        lambda t, m: t.pop("types.1.mlp"),
        r"is not a complete unit map: tensor\(s\) types\.1\.mlp missing",
    ),
    "layer removed": (
        lambda t, m: [t.pop(k) for k in list(t) if ".2." in k],
        r"tensor\(s\) types\.2\.mlp, safety\.2\.mlp, utility\.2\.mlp, types\.2\.attn, safety\.2\.attn, "
        r"utility\.2\.attn missing \(the map's fingerprint describes 3 layers of mlp, attn\)",
    ),
    "width differs from the fingerprint": (
        lambda t, m: _edit_json(m, "fingerprint", lambda f: _set(f["widths"], "mlp", [40, 40, 30])),
        r"tensor types\.2\.mlp has 40 entries, but the map's fingerprint gives layer 2's mlp block 30 units",
    ),
    "scores of another length": (
        lambda t, m: _set(t, "safety.1.attn", t["safety.1.attn"][:20].clone()),
        r"tensor safety\.1\.attn has 20 entries, but the map's fingerprint gives layer 1's attn block 24 units",
    ),
    "type codes outside UNIT_TYPES": (
        lambda t, m: _set(t, "types.0.attn", _with_value(t["types.0.attn"], 3, 7)),
        r"tensor types\.0\.attn holds type codes \[7\] outside 0\.\.3 \(UNIT_TYPES \('CU', 'SCU', 'UCU', 'RU'\)\)",
    ),
    "non-finite scores": (
        lambda t, m: _set(t, "utility.0.mlp", _with_value(t["utility.0.mlp"], 5, math.nan)),
        r"tensor utility\.0\.mlp holds 1 non-finite score\(s\) \(NaN/inf\)",
    ),
    "unexpected tensors": (
        lambda t, m: t.update({"weight": torch.zeros(2), "types.3.mlp": torch.zeros(40, dtype=torch.int8)}),
        r"holds unexpected tensor\(s\) types\.3\.mlp, weight \(a unit map holds exactly "
        r"types/safety/utility\.<layer>\.<kind> for the 3 layers and the blocks mlp, attn of its fingerprint\)",
    ),
    "types of another dtype": (
        lambda t, m: _set(t, "types.0.mlp", t["types.0.mlp"].int()),
        r"tensor types\.0\.mlp has dtype int32, expected int8",
    ),
    "scores of another dtype": (
        lambda t, m: _set(t, "safety.0.mlp", t["safety.0.mlp"].double()),
        r"tensor safety\.0\.mlp has dtype float64, expected float32",
    ),
    "scores not a vector": (
        lambda t, m: _set(t, "safety.0.mlp", t["safety.0.mlp"].reshape(4, 10).clone()),
        r"tensor safety\.0\.mlp has shape \[4, 10\], expected a vector",
    ),
    "metadata field missing": (lambda t, m: m.pop("fingerprint"), r"metadata field 'fingerprint' is missing"),
    "metadata not JSON": (
        lambda t, m: _set(m, "settings", '{"scu": 0.1,'),
        r"metadata field 'settings' is not valid JSON \(.*\)",
    ),
    "fingerprint without widths": (
        lambda t, m: _edit_json(m, "fingerprint", lambda f: f.pop("widths")),
        r"metadata field 'fingerprint' must hold num_layers \(a positive integer\) and widths",
    ),
    "fingerprint widths of another layer count": (
        lambda t, m: _edit_json(m, "fingerprint", lambda f: _set(f, "num_layers", 2)),
        r"the fingerprint's widths of 'mlp' list 3 layers, but num_layers is 2",
    ),
    "unknown ranking": (
        lambda t, m: _edit_json(m, "settings", lambda s: _set(s, "ranking", "sideways")),
        r"metadata field 'settings': ranking must be 'global' or 'per_layer', got 'sideways'",
    ),
    "composite fraction out of range": (
        lambda t, m: _set(m, "composite_fraction", "2.0"),
        r"metadata field 'composite_fraction' must be a number in \[0, 1\], got 2\.0",
    ),
}


@pytest.fixture
def saved_map(tmp_path) -> Path:
    path = tmp_path / "map.safetensors"
    UnitMap.from_scores(random_scores(1), random_scores(2), scu=0.1, ucu=0.1, ru=0.2).save(path)
    return path


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_load_checks_the_tensors_against_the_metadata(tmp_path, saved_map, corruption):
    edit, problem = CORRUPTIONS[corruption]
    path = edited_copy(saved_map, tmp_path / "edited.safetensors", edit)
    content = path.read_bytes()
    with pytest.raises(ValueError) as refused:
        UnitMap.load(path)
    message = str(refused.value)
    assert message.startswith(str(path)), message  # names the file ...
    assert re.search(problem, message), message  # ... and the problem
    assert path.read_bytes() == content
    UnitMap.load(saved_map)  # the unedited map loads


@pytest.mark.parametrize("damage", ["not safetensors", "truncated", "empty"])
def test_load_names_the_file_when_it_cannot_be_parsed(tmp_path, saved_map, damage):
    path = tmp_path / "damaged.safetensors"
    content = saved_map.read_bytes()
    path.write_bytes(
        {"not safetensors": b"certainly not a unit map", "truncated": content[: len(content) // 2], "empty": b""}[
            damage
        ]
    )
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not a readable safetensors file \(.+\)"):
        UnitMap.load(path)


# ----------------------------------------------------------------------------------------------------
# Reproducible, atomic saves
# ----------------------------------------------------------------------------------------------------


def test_saves_are_byte_identical(tmp_path):
    first = UnitMap.from_scores(random_scores(1), random_scores(2), scu=0.1, ucu=0.1, ru=0.2)
    first.metadata = {"scan": {"b": 1, "a": [2, 3]}, "note": "x"}
    second = UnitMap.from_scores(random_scores(1), random_scores(2), scu=0.1, ucu=0.1, ru=0.2)
    second.metadata = {"note": "x", "scan": {"a": [2, 3], "b": 1}}  # equal, in another order
    paths = [tmp_path / f"{name}.safetensors" for name in ("a", "b", "c")]
    first.save(paths[0])
    second.save(paths[1])
    UnitMap.load(paths[0]).save(paths[2])  # a loaded and saved again map too
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]


KILLED_SAVE = """
import os, sys
from ssah_peft import UnitMap

unit_map = UnitMap.load(sys.argv[1])
unit_map.metadata["note"] = "the save that is killed"
os.replace = lambda *args, **kwargs: os._exit(9)  # dies once the new file is written, before it is put in place
unit_map.save(sys.argv[1])
"""


def test_a_killed_save_leaves_the_old_map_and_the_next_save_leaves_no_stray_files(tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    path = folder / "map.safetensors"
    unit_map = UnitMap.from_scores(random_scores(1), random_scores(2), scu=0.1, ucu=0.1, ru=0.2)
    unit_map.save(path)
    old = path.read_bytes()
    for _ in range(2):
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_SAVE, str(path)], capture_output=True, text=True, timeout=300
        )
        assert killed.returncode == 9, killed.stderr[-2000:]
        assert path.read_bytes() == old  # the map is the old one, whole
    assert len(list(folder.iterdir())) == 3  # the two killed saves left their temporary files
    unit_map.metadata["note"] = "saved"
    unit_map.save(path)
    assert [p.name for p in folder.iterdir()] == ["map.safetensors"]
    assert UnitMap.load(path).metadata == {"note": "saved"}


def test_maps_are_made_only_from_finite_scores():
    safety = random_scores(1)
    broken = random_scores(2)
    broken.scores["attn"][1][4] = float("inf")
    with pytest.raises(ValueError, match=r"The utility scores of layer 1's attn block hold NaN/inf \(as float32\)"):
        UnitMap.from_scores(safety, broken)
    huge = make_scores({"mlp": [[1e300, 1.0]], "attn": [[1.0]]})  # finite in float64, inf in a map's float32
    with pytest.raises(ValueError, match=r"The safety scores of layer 0's mlp block hold NaN/inf"):
        UnitMap.from_scores(huge, make_scores({"mlp": [[1.0, 1.0]], "attn": [[1.0]]}))


def test_union_units_is_the_normal_form_of_unit_sets():
    assert union_units({0: {"mlp": [3, 1, 3]}}) == {"0": {"mlp": [1, 3]}}
    united = union_units({0: {"mlp": [3, 1]}}, {"0": {"mlp": torch.tensor([2, 3]), "attn": []}, 1: {"attn": [5]}})
    assert united == {"0": {"mlp": [1, 2, 3], "attn": []}, "1": {"attn": [5]}}
    assert union_units() == {}


def test_default_proportions_are_the_defaults_of_from_scores_and_the_cli():
    import inspect

    from ssah_peft.cli import build_parser

    parameters = inspect.signature(UnitMap.from_scores).parameters
    assert {name: parameters[name].default for name in DEFAULT_PROPORTIONS} == dict(DEFAULT_PROPORTIONS)
    args = build_parser().parse_args(["units", "merge-scores", "p.safetensors", "--out", "m.safetensors"])
    assert {name: getattr(args, name) for name in DEFAULT_PROPORTIONS} == dict(DEFAULT_PROPORTIONS)
