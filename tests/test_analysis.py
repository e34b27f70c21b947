"""Analysis tools: reversible unit ablation (fp and 4-bit), planted units vs a random control, the reasoning-direction
probe against a direct computation, the degradation scan on a synthetic metric, figures, the run-dir report, and the
probe/ablate/scan/report commands end to end on a saved tiny model."""

from __future__ import annotations

import csv
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import model_scores, tiny_model, tiny_tokenizer, tiny_units
from test_unit_map import SAFETY_TOKENS, planted_llama, planted_units, random_scores

from ssah_peft import UnitMap, dense_weight, disable_cpu_4bit_repacking, resolve_architecture, unit_slices
from ssah_peft.analysis import (
    AblationRow,
    AblationTable,
    ProbeResult,
    ScanResult,
    ablate,
    build_report,
    degradation_scan,
    draw_comparisons,
    draw_name,
    draw_sets,
    plot_ablation,
    plot_migration,
    plot_probe,
    plot_scan,
    plot_unit_types,
    probe_reasoning_direction,
    random_units_like,
    top_units,
)
from ssah_peft.analysis.scan import DEFAULT_TOLERANCES
from ssah_peft.cli import analysis as commands
from ssah_peft.cli import main
from ssah_peft.data import load_builtin
from ssah_peft.evaluate import perplexity

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


def test_draw_sets_are_independent_draws_of_each_types_counts():
    model = tiny_model("llama", vocab_size=128).float()
    unit_map = UnitMap.from_scores(model_scores(model, 1), model_scores(model, 2), scu=0.05, ucu=0.1, ru=0.1)
    sets = draw_sets(unit_map, model, ["SCU", "UCU"], [0, 1, 2])
    assert list(sets) == [
        "SCU",
        *(draw_name("SCU", d) for d in range(3)),
        "UCU",
        *(draw_name("UCU", d) for d in range(3)),
    ]
    for unit_type in ("SCU", "UCU"):
        chosen = sets[unit_type]
        assert chosen == unit_map.units_of(unit_type)
        draws = [sets[draw_name(unit_type, d)] for d in range(3)]
        for drawn in draws:
            for layer, blocks in chosen.items():
                for kind, indices in blocks.items():
                    assert len(drawn[layer][kind]) == len(indices) and not set(drawn[layer][kind]) & set(indices)
        assert draws[0] != draws[1] != draws[2] != draws[0]
    with pytest.raises(ValueError, match="distinct"):
        draw_sets(unit_map, model, ["SCU"], [1, 1])


def test_draw_comparisons_find_a_type_far_below_its_draws_and_not_one_among_them():
    rng = torch.Generator().manual_seed(0)

    def point(harmful: float) -> dict[str, float]:
        noise = torch.randn(3, generator=rng).tolist()
        return {"harmful_margin": harmful + noise[0], "selectivity": 1 + noise[1], "task_loss": 2 + noise[2]}

    points = {"SCU": point(-20.0), "UCU": point(0.0)}
    points.update({draw_name(t, d): point(0.0) for t in ("SCU", "UCU") for d in range(5)})
    rows = draw_comparisons(points, ["SCU", "UCU"], range(5))
    assert [(r["type"], r["measure"]) for r in rows] == [
        (t, m) for t in ("SCU", "UCU") for m in ("harmful_margin", "selectivity", "task_loss")
    ]
    by = {(r["type"], r["measure"]): r for r in rows}
    scu = by["SCU", "harmful_margin"]
    values = [points[draw_name("SCU", d)]["harmful_margin"] for d in range(5)]
    assert scu["draws_mean"] == pytest.approx(sum(values) / 5) and scu["draws"] == 5
    assert scu["difference"] == pytest.approx(points["SCU"]["harmful_margin"] - scu["draws_mean"])
    assert scu["holm_p"] < 0.01 and scu["rank_p"] == pytest.approx(1 / 6)
    assert by["UCU", "harmful_margin"]["holm_p"] > 0.05
    assert all(r["holm_p"] >= r["p"] for r in rows)


def test_draw_comparisons_fall_back_to_the_rank_test_when_the_draws_are_equal():
    # a rate read on a few prompts: every draw 0.2, the type 0.9; the t statistic is undefined
    points = {"SCU": {"asr": 0.9}, **{draw_name("SCU", d): {"asr": 0.2} for d in range(5)}}
    (row,) = draw_comparisons(points, ["SCU"], range(5), {"asr": "greater"})
    assert row["t"] is None and row["draws_sd"] == 0 and row["difference"] == pytest.approx(0.7)
    assert row["p"] == row["rank_p"] == pytest.approx(1 / 6) == row["holm_p"]
    points["SCU"]["asr"] = 0.2
    (tie,) = draw_comparisons(points, ["SCU"], range(5), {"asr": "greater"})
    assert tie["p"] == pytest.approx(1.0)  # as extreme as every draw


SIZES_4BIT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def test_4bit_ablation_zeroes_within_quantization_error_and_restores_the_quantized_storage(tmp_path, avx512bf16_cpu):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama", **SIZES_4BIT).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    before = model.model.layers[0].mlp.down_proj.weight.data.clone()
    assert model.model.layers[0].mlp.down_proj.support_avx512bf16_for_cpu  # armed to repack, whatever this CPU is
    disable_cpu_4bit_repacking(model)
    input_ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        model(input_ids)  # an eval forward, the one that would repack the weights
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.data, before)
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
        y = ha[0, len(query) :].double().mean(0) if mean else ha[0, -1].double()
        result.append(1 - (x @ y) / (x.norm() * y.norm()))
    return torch.stack(result)


@pytest.mark.parametrize("mean", [False, True])
def test_probe_distances_equal_a_direct_computation(mean):
    model = tiny_model("llama", vocab_size=128).float()
    tokenizer = tiny_tokenizer()
    prompts = ["How do I pick a lock?", "Tell me something bad", "x"]
    refusals, compliances = ["I'm sorry, no.", "I cannot."], ["Sure, here", "Of course:"]
    result = probe_reasoning_direction(
        model,
        tokenizer,
        prompts,
        refusal_openings=refusals,
        compliance_openings=compliances,
        max_appended=4,
        mean_over_appended=mean,
        batch_size=3,
        show_progress=False,
    )
    assert result.refusal.shape == (3, 2, 4) and result.compliance.shape == (3, 2, 4)
    for p, prompt in enumerate(prompts):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        query = tokenizer(text, add_special_tokens=False)["input_ids"]
        for openings, distances in ((refusals, result.refusal), (compliances, result.compliance)):
            for k in range(1, 5):
                expected = torch.stack(
                    [
                        direct_distance(model, query, tokenizer(o, add_special_tokens=False)["input_ids"][:k], mean)
                        for o in openings
                    ]
                ).mean(0)
                torch.testing.assert_close(distances[p, :, k - 1], expected, atol=1e-5, rtol=1e-4)
    preference = result.refusal_preference()
    assert ((preference >= 0) & (preference <= 1)).all()
    assert result.verdict().startswith(f"prefers refusal in {result.blocks_preferring_refusal()} of 2 blocks")


def test_probe_rejects_openings_shorter_than_max_appended():
    with pytest.raises(ValueError, match="shorter than max_appended"):
        probe_reasoning_direction(
            tiny_model("llama", vocab_size=128),
            tiny_tokenizer(),
            ["q"],
            refusal_openings=["no"],
            max_appended=5,
            show_progress=False,
        )


# ----------------------------------------------------------------------------------------------------
# Degradation scan
# ----------------------------------------------------------------------------------------------------


def test_scan_stops_at_the_first_fraction_beyond_tolerance(tmp_path):
    model = tiny_model("llama").float()  # 2 layers x (48 mlp + 32 attn) = 160 units
    before = {k: v.clone() for k, v in model.state_dict().items()}
    safety, utility = model_scores(model, 1), model_scores(model, 2)
    spec = resolve_architecture(model.config)
    seen = []

    def zeroed_share(m) -> dict[str, float]:
        """Synthetic metric: the share of output-projection columns that are zero, and which they are."""
        zero = {
            (layer, kind): torch.nonzero((dense_weight(module) == 0).all(0)).flatten().tolist()
            for kind, layer, _, module in spec.output_projections(m)
        }
        seen.append(zero)
        return {"zeroed": sum(len(v) for v in zero.values()) / 160}

    unit_map = UnitMap.from_scores(safety, utility)
    result = degradation_scan(
        model,
        None,
        safety,
        utility,
        "SCU",
        fractions=[0.2, 0.05, 0.1, 0.15],
        metric_fn=zeroed_share,
        tolerance={"zeroed": 0.12},
        unit_map=unit_map,
        show_progress=False,
    )
    assert result.fractions == [0.05, 0.1, 0.15]  # 8, 16, 24 units: 24/160 > 0.12 stops the scan
    assert result.chosen_fraction == 0.1
    assert [m["zeroed"] for m in result.metrics] == [0.05, 0.1, 0.15]
    # each step ablated exactly the units with the largest I_S - I_U
    expected = top_units(safety, utility, "SCU", 0.1)
    assert seen[2] == {(int(layer), kind): idx for layer, blocks in expected.items() for kind, idx in blocks.items()}
    difference = torch.cat([safety[i, k] - utility[i, k] for i in range(2) for k in ("mlp", "attn")])
    chosen = torch.cat([(safety[i, k] - utility[i, k])[expected[str(i)][k]] for i in range(2) for k in ("mlp", "attn")])
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


def synthetic_probe() -> ProbeResult:
    generator = torch.Generator().manual_seed(0)
    return ProbeResult(
        refusal=torch.rand(5, 4, 3, generator=generator, dtype=torch.float64) * 0.5,
        compliance=torch.rand(5, 4, 3, generator=generator, dtype=torch.float64) * 0.5 + 0.3,
    )


def synthetic_table() -> AblationTable:
    rows = [
        AblationRow(name, 10 * i, 0.01 * i, 0.1 * i, 0.05, 0.5 - 0.05 * i, 5.0 + i, 1.0)
        for i, name in enumerate(["none", "SCU", "UCU", "random (SCU-sized)"])
    ]
    return AblationTable(rows=rows)


def test_figures_are_written_with_their_data(tmp_path):
    before, after = (UnitMap.from_scores(random_scores(s), random_scores(s + 10)) for s in (0, 1))
    assert_figure(plot_unit_types(before, tmp_path / "types.png"), rows=3 * 2)
    assert_figure(plot_migration(before.migration(after), tmp_path / "migration.png"), rows=16)
    with open(tmp_path / "migration.csv", encoding="utf-8") as f:
        assert sum(int(r["count"]) for r in csv.DictReader(f)) == before.migration(after).total
    assert_figure(plot_probe(synthetic_probe(), tmp_path / "probe.png"), rows=4 + 3)
    assert_figure(plot_ablation(synthetic_table(), tmp_path / "ablation.png"), rows=4)


def synthetic_scans() -> list[ScanResult]:
    """RU breaks on the NLL at its third step; SCU at its first, so nothing is chosen; UCU never breaks (its NLL
    moves, but UCU does not watch the NLL)."""
    baseline = {"refusal_rate": 0.9, "mean_nll": 2.0}

    def steps(*values: tuple[float, float]) -> list[dict[str, float]]:
        return [{"refusal_rate": r, "mean_nll": n} for r, n in values]

    return [
        ScanResult(
            "RU",
            baseline,
            [0.01, 0.05, 0.1],
            steps((0.9, 2.02), (0.85, 2.05), (0.8, 2.3)),
            DEFAULT_TOLERANCES["RU"],
            chosen_fraction=0.05,
        ),
        ScanResult("SCU", baseline, [0.01], steps((0.4, 2.2)), DEFAULT_TOLERANCES["SCU"], chosen_fraction=0.0),
        ScanResult(
            "UCU",
            baseline,
            [0.01, 0.05],
            steps((0.88, 2.5), (0.85, 3.0)),
            DEFAULT_TOLERANCES["UCU"],
            chosen_fraction=0.05,
        ),
    ]


def test_scan_figure_has_a_csv_row_per_scan_step(tmp_path):
    scans = synthetic_scans()
    png = plot_scan(scans, tmp_path / "scan.png")
    assert_figure(png, rows=sum(1 + len(scan.fractions) for scan in scans))
    with open(png.with_suffix(".csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    expected = [
        (scan, fraction, values)
        for scan in scans
        for fraction, values in zip([0.0, *scan.fractions], [scan.baseline, *scan.metrics])
    ]
    for row, (scan, fraction, values) in zip(rows, expected):
        assert (row["criterion"], float(row["fraction"])) == (scan.criterion, fraction)
        assert {name: float(row[name]) for name in values} == values
        for name in ("refusal_rate", "mean_nll"):
            tolerance = row[f"{name}_tolerance"]
            assert (float(tolerance) if tolerance else None) == scan.tolerances.get(name)
        assert (row["chosen"] == "True") == (fraction == scan.chosen_fraction)
    broken = [(r["criterion"], float(r["fraction"]), r["beyond_tolerance"]) for r in rows if r["beyond_tolerance"]]
    assert broken == [("RU", 0.1, "mean_nll"), ("SCU", 0.01, "mean_nll")]
    with pytest.raises(ValueError, match="No scan results"):
        plot_scan([], tmp_path / "none.png")


def test_report_assembles_a_run_directory(tmp_path):
    synthetic_probe().save(tmp_path / "probe.json")
    synthetic_table().save(tmp_path / "ablation.json")
    UnitMap.from_scores(random_scores(0), random_scores(10)).save(tmp_path / "unitmap_before.safetensors")
    UnitMap.from_scores(random_scores(1), random_scores(11)).save(tmp_path / "unitmap_after.safetensors")
    (tmp_path / "scan_RU.json").write_text(
        json.dumps(
            {
                "criterion": "RU",
                "baseline": {"m": 1.0},
                "fractions": [0.1],
                "metrics": [{"m": 1.0}],
                "tolerances": {"m": 0.1},
                "chosen_fraction": 0.1,
            }
        )
    )
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for heading in (
        "probe",
        "Unit ablation",
        "Degradation scan curves",
        "Degradation scan: RU",
        "unitmap_before",
        "migration",
    ):
        assert heading in report
    assert "prefers refusal in 4 of 4 blocks" in report
    for name in ("probe", "ablation", "scan", "unitmap_before", "unitmap_after", "migration"):
        assert (tmp_path / "figures" / f"{name}.png").is_file() and f"figures/{name}.png" in report
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "figures")


# ----------------------------------------------------------------------------------------------------
# Commands end to end
# ----------------------------------------------------------------------------------------------------

PROBE_PROMPTS, MAX_APPENDED, EVAL_LIMIT, SCAN_FRACTIONS = 2, 3, 2, (0.05, 0.2)


@pytest.fixture(scope="module")
def command_run(tmp_path_factory) -> SimpleNamespace:
    """A saved tiny llama with the tiny tokenizer and a unit map of it (also the run's ``unitmap_before``); the
    probe, ablate and scan commands then write into one run directory, with tiny limits so that all three take a
    few seconds. Each command's printout and the model object it loaded are kept, to check the model afterwards."""
    root = tmp_path_factory.mktemp("commands")
    checkpoint, run_dir = root / "model", root / "run"
    model = tiny_model("llama", vocab_size=128).float()
    model.save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    unit_map = UnitMap.from_scores(model_scores(model, 1), model_scores(model, 2), scu=0.05, ucu=0.1, ru=0.1)
    run_dir.mkdir()
    unit_map.save(run_dir / "unitmap_before.safetensors")
    common = ["--model", str(checkpoint), "--out-dir", str(run_dir), "--no-progress"]
    arguments = {
        "probe": ["--limit", str(PROBE_PROMPTS), "--max-appended", str(MAX_APPENDED)],
        "ablate": [
            "--unit-map",
            str(run_dir / "unitmap_before.safetensors"),
            "--limit",
            str(EVAL_LIMIT),
            "--max-new-tokens",
            "2",
        ],
        "scan": [
            "--unit-map",
            str(run_dir / "unitmap_before.safetensors"),
            "--limit",
            str(EVAL_LIMIT),
            "--fractions",
            *map(str, SCAN_FRACTIONS),
            "--out-map",
            str(run_dir / "unitmap_after.safetensors"),
        ],
    }
    loaded, printed = {}, {}
    load = commands.load_model

    def keep(args):
        loaded[args.command], tokenizer = load(args)
        return loaded[args.command], tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(commands, "load_model", keep)
        for command, extra in arguments.items():
            with redirect_stdout(io.StringIO()) as out:
                assert main([command, *common, *extra]) == 0
            printed[command] = out.getvalue()
    return SimpleNamespace(checkpoint=checkpoint, run_dir=run_dir, unit_map=unit_map, loaded=loaded, printed=printed)


def assert_unchanged(model, checkpoint: Path) -> None:
    """The model's weights are bit-exactly those of the checkpoint it was loaded from."""
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")
    state = model.state_dict()
    assert saved and all(torch.equal(state[key], value) for key, value in saved.items())


def test_probe_command_writes_the_distances_of_the_first_prompts(command_run):
    result = ProbeResult.load(command_run.run_dir / "probe.json")
    assert result.refusal.shape == result.compliance.shape == (PROBE_PROMPTS, 2, MAX_APPENDED)
    for distances in (result.refusal, result.compliance):
        assert torch.isfinite(distances).all() and (distances >= 0).all() and (distances <= 2).all()
    prompts = [r["prompt"] for r in load_builtin("harmful_eval")][:PROBE_PROMPTS]
    direct = probe_reasoning_direction(
        command_run.loaded["probe"], tiny_tokenizer(), prompts, max_appended=MAX_APPENDED, show_progress=False
    )
    torch.testing.assert_close(result.refusal, direct.refusal)
    torch.testing.assert_close(result.compliance, direct.compliance)
    assert f"The model {result.verdict()}" in command_run.printed["probe"]
    assert json.loads((command_run.run_dir / "probe.json").read_text())["verdict"] == result.verdict()
    assert_figure(command_run.run_dir / "probe.png", rows=2 + MAX_APPENDED)


def test_ablate_command_measures_every_type_and_leaves_the_model_intact(command_run):
    table = AblationTable.load(command_run.run_dir / "ablation.json")
    unit_map = command_run.unit_map
    sizes = {
        t: sum(len(i) for blocks in unit_map.units_of(t).values() for i in blocks.values())
        for t in ("SCU", "UCU", "RU", "CU")
    }
    assert [(r.name, r.num_units) for r in table.rows] == [
        ("none", 0),
        *sizes.items(),
        ("random (SCU-sized)", sizes["SCU"]),
    ]
    for row in table.rows:
        assert row.share == row.num_units / 160
        assert all(0 <= value <= 1 for value in (row.asr, row.overrefusal, row.accuracy))
        assert math.isfinite(row.perplexity) and row.perplexity > 1
    assert table.settings["limit"] == EVAL_LIMIT and table.settings["max_new_tokens"] == 2
    # the intact row is the model as saved, the model is restored after the last set, and ablating did something
    model = command_run.loaded["ablate"]
    assert_unchanged(model, command_run.checkpoint)
    records = list(load_builtin("utility_calibration"))[:EVAL_LIMIT]
    intact = perplexity(model, tiny_tokenizer(), records, batch_size=16, show_progress=False)["ppl"]
    assert table.rows[0].perplexity == pytest.approx(intact, rel=1e-6)
    assert any(row.perplexity != table.rows[0].perplexity for row in table.rows[1:])
    assert table.markdown() in command_run.printed["ablate"]
    assert_figure(command_run.run_dir / "ablation.png", rows=len(table.rows))


def test_scan_command_writes_each_criterion_the_figure_and_the_resized_map(command_run):
    run_dir = command_run.run_dir
    scans = [ScanResult.load(run_dir / f"scan_{criterion}.json") for criterion in ("RU", "SCU", "UCU")]
    for scan in scans:
        assert scan.tolerances == DEFAULT_TOLERANCES[scan.criterion]
        assert scan.fractions and scan.fractions == list(SCAN_FRACTIONS[: len(scan.fractions)])
        assert len(scan.metrics) == len(scan.fractions)
        for values in (scan.baseline, *scan.metrics):
            assert set(values) == {"refusal_rate", "mean_nll"}
            assert 0 <= values["refusal_rate"] <= 1 and 0 < values["mean_nll"] < 20
        within = [all(abs(m[k] - scan.baseline[k]) <= t for k, t in scan.tolerances.items()) for m in scan.metrics]
        assert all(within[:-1]) and (within[-1] or len(scan.fractions) < len(SCAN_FRACTIONS))  # stops at a break
        assert scan.chosen_fraction == max([0.0] + [f for f, ok in zip(scan.fractions, within) if ok])
    # the criteria were scanned one after the other on the same model: it was restored between them
    assert scans[0].baseline == scans[1].baseline == scans[2].baseline
    assert_unchanged(command_run.loaded["scan"], command_run.checkpoint)
    assert_figure(run_dir / "scan.png", rows=sum(1 + len(scan.fractions) for scan in scans))
    resized = UnitMap.load(run_dir / "unitmap_after.safetensors")
    resized.check_model(command_run.loaded["scan"])
    assert {k: resized.settings[k] for k in ("ru", "scu", "ucu")} == {
        scan.criterion.lower(): scan.chosen_fraction for scan in scans
    }
    assert {c: s["chosen_fraction"] for c, s in resized.metadata["scan"].items()} == {
        scan.criterion: scan.chosen_fraction for scan in scans
    }
    for scan in scans:
        assert f"{scan.criterion}: chosen fraction {scan.chosen_fraction}" in command_run.printed["scan"]


def test_report_command_assembles_the_command_outputs(command_run):
    run_dir = command_run.run_dir
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert ProbeResult.load(run_dir / "probe.json").verdict() in report
    assert AblationTable.load(run_dir / "ablation.json").markdown() in report
    for criterion in ("RU", "SCU", "UCU"):
        scan = ScanResult.load(run_dir / f"scan_{criterion}.json")
        assert f"## Degradation scan: {criterion}\n\nChosen fraction {scan.chosen_fraction} " in report
        assert f"| {scan.fractions[-1]} | " in report
    for name in ("probe", "ablation", "scan", "unitmap_before", "unitmap_after", "migration"):
        assert f"](figures/{name}.png)" in report and f"](figures/{name}.csv)" in report
        assert (run_dir / "figures" / f"{name}.png").stat().st_size > 1000
    with (
        open(run_dir / "figures" / "scan.csv", encoding="utf-8") as f,
        open(run_dir / "scan.csv", encoding="utf-8") as g,
    ):
        assert f.read() == g.read()  # the report redraws the command's figure from the saved results
