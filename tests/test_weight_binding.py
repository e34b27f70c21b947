"""Unit maps and adapters are bound to the weights of the model they were made on (issue 24.1): refused on another
checkpoint of identical shapes (another seed, a fine-tuned sibling), accepted with ``allow_other_weights=True`` /
``--allow-other-weights``, and accepted on their own model loaded in float32, bfloat16, 8-bit or 4-bit NF4."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from helpers import model_scores, tiny_model, tiny_tokenizer, tiny_units
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ssah_peft import SSAHConfig, SSAHLayer, UnitMap
from ssah_peft.cli import main
from ssah_peft.fingerprint import SAMPLE_LENGTH, model_fingerprint, weight_sample_agreement
from ssah_peft.quantization import dense_weight
from ssah_peft.units import resolve_architecture

# dims are multiples of 64, as bitsandbytes' CPU kernels expect
SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
LOADS = {
    "float32": dict(dtype=torch.float32),
    "bfloat16": dict(dtype=torch.bfloat16),
    "nf4": dict(quantization_config=BitsAndBytesConfig(**NF4, bnb_4bit_use_double_quant=True), device_map="cpu"),
    "int8": dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"),
}
OTHER_WEIGHTS = "other weights than"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model ("own"), another seed of it, and a sibling whose every weight moved by 5% of its spread (a
    stand-in for a fine-tune of it), all of identical shapes and saved in float32."""
    root = tmp_path_factory.mktemp("weights")
    sibling = tiny_model("llama", **SIZES)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in sibling.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05 * param.std())
    models = {
        "own": tiny_model("llama", **SIZES),
        "other-seed": tiny_model("llama", seed=1, **SIZES),
        "sibling": sibling,
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}


def load(path: Path, how: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, **LOADS[how]).eval()


def unit_map_of(model: torch.nn.Module) -> UnitMap:
    return UnitMap.from_scores(model_scores(model, 0), model_scores(model, 1), scu=0.05, ru=0.1, ucu=0.1)


def ssah_layers(model: torch.nn.Module) -> list[SSAHLayer]:
    return [m for m in model.modules() if isinstance(m, SSAHLayer)]


@pytest.mark.parametrize("other", ["other-seed", "sibling"])
@pytest.mark.parametrize("how", ["float32", "nf4"])
def test_a_map_is_refused_on_another_checkpoint_of_the_same_shapes(checkpoints, other: str, how: str) -> None:
    unit_map = unit_map_of(load(checkpoints["own"], "float32"))
    model = load(checkpoints[other], how)
    found = model_fingerprint(model)
    assert found["widths"] == unit_map.fingerprint["widths"]
    # another seed agrees on 0-7% of the sampled values; the 5% sibling on ~5% in float, ~84% through NF4's codes
    assert weight_sample_agreement(unit_map.fingerprint["weight_sample"], found["weight_sample"]) < 0.9
    with pytest.raises(ValueError, match=OTHER_WEIGHTS) as refusal:
        unit_map.check_model(model)
    message = str(refusal.value)
    assert "though the shapes match" in message and "sampled weight values agree" in message
    assert "allow_other_weights=True" in message and "--allow-other-weights" in message
    with pytest.raises(ValueError, match=OTHER_WEIGHTS):
        get_peft_model(model, SSAHConfig(units=unit_map, mode="protect", r=4))
    assert not ssah_layers(model)  # refused before any module was replaced

    unit_map.check_model(model, allow_other_weights=True)  # on purpose: accepted
    adapted = get_peft_model(model, SSAHConfig(units=unit_map, mode="protect", r=4, allow_other_weights=True))
    assert ssah_layers(adapted)


def test_a_map_is_accepted_on_its_own_model_however_loaded(checkpoints, tmp_path: Path) -> None:
    models = {how: load(checkpoints["own"], how) for how in LOADS}
    for made_on, model in models.items():
        path = tmp_path / f"{made_on}.safetensors"
        unit_map_of(model).save(path)
        unit_map = UnitMap.load(path)  # the sample survives the file
        assert len(unit_map.fingerprint["weight_sample"]["weights"]) == 4  # two block kinds, first and last layer
        for other in models.values():
            found = model_fingerprint(other)["weight_sample"]
            assert weight_sample_agreement(unit_map.fingerprint["weight_sample"], found) >= 0.99
            unit_map.check_model(other)  # accepted
    adapted = get_peft_model(models["nf4"], SSAHConfig(units=UnitMap.load(tmp_path / "float32.safetensors"), r=4))
    assert all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in ssah_layers(adapted))


def test_an_adapter_is_bound_to_the_weights_it_was_made_on(checkpoints, tmp_path: Path) -> None:
    adapted = get_peft_model(
        load(checkpoints["own"], "float32"), SSAHConfig(units=tiny_units(), mode="protect", r=4, init_weights=False)
    )
    adapted.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sum(len(w["values"]) for w in saved["weight_sample"]["weights"]) == 4 * SAMPLE_LENGTH
    assert "allow_other_weights" not in saved  # a permission is never saved with an adapter

    for other in ("other-seed", "sibling"):
        model = load(checkpoints[other], "float32")
        with pytest.raises(ValueError, match="made on other weights than those of the model it is loaded into") as e:
            PeftModel.from_pretrained(model, tmp_path)
        assert "allow_other_weights=True" in str(e.value)
        assert not ssah_layers(model) and not hasattr(model, "peft_config")
    model = load(checkpoints["other-seed"], "float32")
    loaded = PeftModel.from_pretrained(model, tmp_path, allow_other_weights=True)
    assert ssah_layers(loaded)
    # accepted on the model it was made on, in every dtype and in 4-bit; and the loaded update is the saved one
    reference = adapted.base_model.model.model.layers[0].mlp.down_proj.get_delta_weight("default")
    for how in LOADS:
        loaded = PeftModel.from_pretrained(load(checkpoints["own"], how), tmp_path)
        delta = loaded.base_model.model.model.layers[0].mlp.down_proj.get_delta_weight("default")
        torch.testing.assert_close(delta.float(), reference, rtol=1e-2, atol=1e-4)


def test_an_adapter_from_a_map_is_checked_against_its_own_model_when_loaded(checkpoints, tmp_path: Path) -> None:
    """A map used on purpose on another checkpoint: the adapter is bound to the model it was trained on."""
    base_map = unit_map_of(load(checkpoints["other-seed"], "float32"))
    model = load(checkpoints["own"], "float32")
    config = SSAHConfig(units=base_map, mode="protect", r=4, allow_other_weights=True)
    get_peft_model(model, config).save_pretrained(tmp_path)
    assert ssah_layers(PeftModel.from_pretrained(load(checkpoints["own"], "bfloat16"), tmp_path))
    with pytest.raises(ValueError, match="made on other weights"):
        PeftModel.from_pretrained(load(checkpoints["other-seed"], "float32"), tmp_path)


def test_maps_and_adapters_without_a_weight_sample_still_load(checkpoints, tmp_path: Path) -> None:
    """Made before weight samples existed: the shapes are checked, the weights cannot be."""
    own = load(checkpoints["own"], "float32")
    other = load(checkpoints["other-seed"], "float32")
    unit_map = unit_map_of(own)
    del unit_map.fingerprint["weight_sample"]
    unit_map.check_model(other)
    get_peft_model(own, SSAHConfig(units=unit_map, r=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["weight_sample"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert ssah_layers(PeftModel.from_pretrained(other, tmp_path))


@pytest.mark.parametrize("double_quant", [False, True])
def test_the_sample_dequantizes_only_its_blocks(checkpoints, double_quant: bool, monkeypatch) -> None:
    """Cheap at any size: 256 values, and of a 4-bit weight only the sampled block is dequantized (a full
    dequantization is made to fail here), giving the values a full dequantization gives at those positions."""
    config = BitsAndBytesConfig(**NF4, bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(checkpoints["own"], quantization_config=config, device_map="cpu")
    with monkeypatch.context() as patched:
        for name in ("dequantize_4bit", "dequantize_blockwise"):
            patched.setattr(bnb.functional, name, lambda *args, **kwargs: pytest.fail("full dequantization"))
        sample = model_fingerprint(model)["weight_sample"]
    spec = resolve_architecture(model.config)
    assert len(sample["weights"]) == 4
    for entry in sample["weights"]:
        module = model.model.layers[entry["layer"]].get_submodule(spec.blocks[entry["kind"]].out_proj)
        full = dense_weight(module).reshape(-1)[entry["start"] : entry["start"] + SAMPLE_LENGTH]
        assert entry["format"] == "4bit" and torch.equal(torch.tensor(entry["values"]), full.float())


def test_finetune_refuses_a_map_of_another_checkpoint_unless_allowed(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "model"
    tiny_model("llama", vocab_size=128).save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    other_map = tmp_path / "other.safetensors"
    unit_map_of(tiny_model("llama", seed=1, vocab_size=128)).save(other_map)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus one?", "response": f"{i + 1}."}) + "\n" for i in range(8)))
    args = ["finetune", "--model", str(checkpoint), "--data", str(data), "--unit-map", str(other_map)]
    args += ["--max-length", "32", "--max-steps", "1", "--no-eval", "--no-progress"]

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 1 and err.startswith("ssah-peft: error: ")
    assert OTHER_WEIGHTS in err and "--allow-other-weights" in err
    assert not (tmp_path / "refused").exists()

    assert main([*args, "--out", str(tmp_path / "run"), "--allow-other-weights"]) == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    own_sample = model_fingerprint(AutoModelForCausalLM.from_pretrained(checkpoint))["weight_sample"]
    assert saved["weight_sample"] == own_sample  # the adapter is bound to the model it was trained on


def test_ablate_refuses_a_map_of_another_checkpoint_unless_allowed(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "model"
    tiny_model("llama", vocab_size=128).save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    other_map = tmp_path / "other.safetensors"
    unit_map_of(tiny_model("llama", seed=1, vocab_size=128)).save(other_map)
    args = ["ablate", "--model", str(checkpoint), "--unit-map", str(other_map), "--types", "SCU"]
    args += ["--no-random-control", "--limit", "1", "--max-new-tokens", "1", "--no-progress"]

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out-dir", str(tmp_path / "refused")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 1 and OTHER_WEIGHTS in err
    assert not (tmp_path / "refused").exists()

    assert main([*args, "--out-dir", str(tmp_path / "run"), "--allow-other-weights"]) == 0
    assert (tmp_path / "run" / "ablation.json").is_file()
