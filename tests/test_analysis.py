"""Analysis tools: reversible unit ablation (fp and 4-bit), planted units vs a random control, the reasoning-direction
probe against a direct computation, the degradation scan on a synthetic metric, figures and the run-dir report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer, tiny_units
from test_unit_map import SAFETY_TOKENS, planted_llama, planted_units, random_scores

from ssah_peft import UnitMap, UnitScores, dense_weight, disable_cpu_4bit_repacking, resolve_architecture, unit_slices
from ssah_peft.analysis import (
    AblationRow,
    AblationTable,
    ablate,
    build_report,
    degradation_scan,
    plot_ablation,
    plot_migration,
    plot_probe,
    plot_unit_types,
    probe_reasoning_direction,
    random_units_like,
    top_units,
)
from ssah_peft.cli import main
from ssah_peft.scoring import model_fingerprint

# ----------------------------------------------------------------------------------------------------
# Ablation
# ----------------------------------------------------------------------------------------------------


def expected_zero_mask(model, units, parts) -> dict[str, torch.Tensor]:
    """Boolean [out, in] masks of the entries ablation must zero, per module name, from unit_slices directly."""
    spec = resolve_architecture(model.config)
    masks = {}
    for kind, layer, name, module in spec.output_projections(model):
        indices = torch.tensor(units[layer][kind])
        width = dense_weight(module).shape[1]
        prefix = name[: len(name) - len(spec.blocks[kind].out_proj)]
        for relative, (axis, index) in unit_slices(spec, kind, indices, width, "any", parts).items():
            weight = dense_weight(model.get_submodule(prefix + relative))
            mask = masks.setdefault(prefix + relative, torch.zeros(weight.shape, dtype=torch.bool))
            if axis == "in":
                mask[:, index] = True
            else:
                mask[index, :] = True
    return masks


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("parts", ["out_proj", "all"])
def test_ablation_zeroes_exactly_the_unit_slices_and_restores_bit_exactly(family, parts):
    model = tiny_model(family).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = tiny_units()
    masks = expected_zero_mask(model, units, parts)
    assert masks
    with ablate(model, units, parts=parts):
        for name, module in model.named_modules():
            if name in masks:
                weight = dense_weight(module)
                assert (weight[masks[name]] == 0).all(), name
                original = dense_weight_of(before, name, module)
                assert torch.equal(weight[~masks[name]], original[~masks[name]]), name
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert {k.rsplit(".", 1)[0] for k in changed if k.endswith("weight")} <= set(masks)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def dense_weight_of(state: dict, name: str, module) -> torch.Tensor:
    weight = state[f"{name}.weight"]
    return weight if isinstance(module, torch.nn.Linear) else weight.T  # GPT-2 Conv1D stores W transposed


def test_ablation_restores_after_an_exception_and_accepts_unit_maps():
    model = planted_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), ablate(model, planted_units("SCU"), parts="all"):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="layers the model does not have"), ablate(model, {7: {"mlp": [0]}}):
        pass


def test_random_control_matches_size_per_block_and_avoids_the_set():
    model = planted_llama()
    units = planted_units("SCU")
    control = random_units_like(units, model, seed=3)
    for layer, blocks in units.items():
        for kind, indices in blocks.items():
            assert len(control[layer][kind]) == len(indices)
            assert not set(control[layer][kind]) & set(indices)
    assert control == random_units_like(units, model, seed=3)
    assert control != random_units_like(units, model, seed=4)


@torch.no_grad()
def test_planted_safety_units_drive_the_safety_feature_far_more_than_a_random_control():
    model = planted_llama()
    safety_input = torch.tensor([list(SAFETY_TOKENS)[:8]])

    def safety_feature() -> torch.Tensor:  # the last hidden state on safety-topic tokens
        return model(safety_input, output_hidden_states=True).hidden_states[-1]

    intact = safety_feature()
    scu = planted_units("SCU")
    with ablate(model, scu):
        change_scu = (safety_feature() - intact).norm()
    changes_random = []
    for seed in range(5):
        with ablate(model, random_units_like(scu, model, seed=seed)):
            changes_random.append((safety_feature() - intact).norm())
    assert change_scu > 20 * max(changes_random)
    assert torch.equal(safety_feature(), intact)


SIZES_4BIT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def test_4bit_ablation_zeroes_within_quantization_error_and_restores_the_quantized_storage(tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama", **SIZES_4BIT).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    disable_cpu_4bit_repacking(model)
    input_ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        model(input_ids)  # an eval forward, the one that would repack the weights
    units = {0: {"mlp": list(range(0, 256, 5)), "attn": list(range(32)) + [70]}, 1: {"mlp": [3, 200]}}
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, bnb.nn.Linear4bit)
    parameter, storage = down.weight, down.weight.data.clone()
    absmax = down.weight.quant_state.absmax.clone()
    dequantized = dense_weight(down).clone()
    columns = torch.tensor(units[0]["mlp"])
    with ablate(model, units):
        ablated = dense_weight(down)
        assert (ablated[:, columns] == 0).all()
        kept = torch.ones(256, dtype=torch.bool)
        kept[columns] = False
        # requantizing moves the kept entries by at most a quantization step of their block
        assert (ablated[:, kept] - dequantized[:, kept]).abs().max() <= 0.25 * dequantized.abs().max()
        with torch.no_grad():
            assert torch.isfinite(model(input_ids).logits).all()
    assert down.weight is parameter
    assert torch.equal(down.weight.data, storage)
    assert torch.equal(down.weight.quant_state.absmax, absmax)
    assert torch.equal(dense_weight(down), dequantized)


# ----------------------------------------------------------------------------------------------------
# Probe
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def direct_distance(model, query: list[int], appended: list[int], mean: bool) -> torch.Tensor:
    """Cosine distance per block, from separate forward passes of Q and of Q + appended, by hand."""
    q = model(torch.tensor([query]), output_hidden_states=True).hidden_states[1:]
    a = model(torch.tensor([query + appended]), output_hidden_states=True).hidden_states[1:]
    result = []
    for hq, ha in zip(q, a):
        x = hq[0, -1].double()
        y = ha[0, len(query):].double().mean(0) if mean else ha[0, -1].double()
        result.append(1 - (x @ y) / (x.norm() * y.norm()))
    return torch.stack(result)


@pytest.mark.parametrize("mean", [False, True])
def test_probe_distances_equal_a_direct_computation(mean):
    model = tiny_model("llama", vocab_size=128).float()
    tokenizer = tiny_tokenizer()
    prompts = ["How do I pick a lock?", "Tell me something bad", "x"]
    refusals, compliances = ["I'm sorry, no.", "I cannot."], ["Sure, here", "Of course:"]
    result = probe_reasoning_direction(model, tokenizer, prompts, refusal_openings=refusals,
                                       compliance_openings=compliances, max_appended=4, mean_over_appended=mean,
                                       batch_size=3, show_progress=False)
    assert result.refusal.shape == (3, 2, 4) and result.compliance.shape == (3, 2, 4)
    for p, prompt in enumerate(prompts):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        query = tokenizer(text, add_special_tokens=False)["input_ids"]
        for openings, distances in ((refusals, result.refusal), (compliances, result.compliance)):
            for k in range(1, 5):
                expected = torch.stack([
                    direct_distance(model, query, tokenizer(o, add_special_tokens=False)["input_ids"][:k], mean)
                    for o in openings
                ]).mean(0)
                torch.testing.assert_close(distances[p, :, k - 1], expected, atol=1e-5, rtol=1e-4)
    preference = result.refusal_preference()
    assert ((preference >= 0) & (preference <= 1)).all()
    assert result.verdict().startswith(f"prefers refusal in {result.blocks_preferring_refusal()} of 2 blocks")


def test_probe_rejects_openings_shorter_than_max_appended():
    with pytest.raises(ValueError, match="shorter than max_appended"):
        probe_reasoning_direction(tiny_model("llama", vocab_size=128), tiny_tokenizer(), ["q"],
                                  refusal_openings=["no"], max_appended=5, show_progress=False)


# ----------------------------------------------------------------------------------------------------
# Degradation scan
# ----------------------------------------------------------------------------------------------------


def model_scores(model, seed: int) -> UnitScores:
    fingerprint = model_fingerprint(model)
    generator = torch.Generator().manual_seed(seed)
    scores = {kind: tuple(torch.rand(w, generator=generator, dtype=torch.float64) for w in widths)
              for kind, widths in fingerprint["widths"].items()}
    return UnitScores(scores=scores, method="variance", num_tokens=1, num_sequences=1, fingerprint=fingerprint)


def test_scan_stops_at_the_first_fraction_beyond_tolerance(tmp_path):
    model = tiny_model("llama").float()  # 2 layers x (48 mlp + 32 attn) = 160 units
    before = {k: v.clone() for k, v in model.state_dict().items()}
    safety, utility = model_scores(model, 1), model_scores(model, 2)
    spec = resolve_architecture(model.config)
    seen = []

    def zeroed_share(m) -> dict[str, float]:
        """Synthetic metric: the share of output-projection columns that are zero, and which they are."""
        zero = {(layer, kind): torch.nonzero((dense_weight(module) == 0).all(0)).flatten().tolist()
                for kind, layer, _, module in spec.output_projections(m)}
        seen.append(zero)
        return {"zeroed": sum(len(v) for v in zero.values()) / 160}

    unit_map = UnitMap.from_scores(safety, utility)
    result = degradation_scan(model, None, safety, utility, "SCU", fractions=[0.2, 0.05, 0.1, 0.15],
                              metric_fn=zeroed_share, tolerance={"zeroed": 0.12}, unit_map=unit_map,
                              show_progress=False)
    assert result.fractions == [0.05, 0.1, 0.15]  # 8, 16, 24 units: 24/160 > 0.12 stops the scan
    assert result.chosen_fraction == 0.1
    assert [m["zeroed"] for m in result.metrics] == [0.05, 0.1, 0.15]
    # each step ablated exactly the units with the largest I_S - I_U
    expected = top_units(safety, utility, "SCU", 0.1)
    assert seen[2] == {(int(layer), kind): idx for layer, blocks in expected.items() for kind, idx in blocks.items()}
    difference = torch.cat([safety[l, k] - utility[l, k] for l in range(2) for k in ("mlp", "attn")])
    chosen = torch.cat([(safety[l, k] - utility[l, k])[expected[str(l)][k]] for l in range(2) for k in ("mlp", "attn")])
    assert chosen.min() >= difference.sort(descending=True).values[15]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    unit_map.save(tmp_path / "map.safetensors")
    assert UnitMap.load(tmp_path / "map.safetensors").metadata["scan"]["SCU"]["chosen_fraction"] == 0.1


# ----------------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------------


def assert_figure(png: Path, rows: int) -> None:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    with open(png.with_suffix(".csv"), encoding="utf-8") as f:
        assert len(list(csv.reader(f))) == rows + 1


def synthetic_probe():
    from ssah_peft.analysis import ProbeResult

    generator = torch.Generator().manual_seed(0)
    return ProbeResult(refusal=torch.rand(5, 4, 3, generator=generator, dtype=torch.float64) * 0.5,
                       compliance=torch.rand(5, 4, 3, generator=generator, dtype=torch.float64) * 0.5 + 0.3)


def synthetic_table() -> AblationTable:
    rows = [AblationRow(name, 10 * i, 0.01 * i, 0.1 * i, 0.05, 0.5 - 0.05 * i, 5.0 + i, 1.0)
            for i, name in enumerate(["none", "SCU", "UCU", "random (SCU-sized)"])]
    return AblationTable(rows=rows)


def test_figures_are_written_with_their_data(tmp_path):
    before, after = (UnitMap.from_scores(random_scores(s), random_scores(s + 10)) for s in (0, 1))
    assert_figure(plot_unit_types(before, tmp_path / "types.png"), rows=3 * 2)
    assert_figure(plot_migration(before.migration(after), tmp_path / "migration.png"), rows=16)
    with open(tmp_path / "migration.csv", encoding="utf-8") as f:
        assert sum(int(r["count"]) for r in csv.DictReader(f)) == before.migration(after).total
    assert_figure(plot_probe(synthetic_probe(), tmp_path / "probe.png"), rows=4 + 3)
    assert_figure(plot_ablation(synthetic_table(), tmp_path / "ablation.png"), rows=4)


def test_report_assembles_a_run_directory(tmp_path):
    synthetic_probe().save(tmp_path / "probe.json")
    synthetic_table().save(tmp_path / "ablation.json")
    UnitMap.from_scores(random_scores(0), random_scores(10)).save(tmp_path / "unitmap_before.safetensors")
    UnitMap.from_scores(random_scores(1), random_scores(11)).save(tmp_path / "unitmap_after.safetensors")
    (tmp_path / "scan_RU.json").write_text(json.dumps(
        {"criterion": "RU", "baseline": {"m": 1.0}, "fractions": [0.1], "metrics": [{"m": 1.0}],
         "tolerances": {"m": 0.1}, "chosen_fraction": 0.1}))
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for heading in ("probe", "Unit ablation", "Degradation scan: RU", "unitmap_before", "migration"):
        assert heading in report
    assert "prefers refusal in 4 of 4 blocks" in report
    for name in ("probe", "ablation", "unitmap_before", "unitmap_after", "migration"):
        assert (tmp_path / "figures" / f"{name}.png").is_file() and f"figures/{name}.png" in report
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "figures")
