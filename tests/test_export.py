"""Exporting SSAH adapters for serving: exact LoRA adapters that plain peft loads, and merged checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_chat_llama, tiny_model, tiny_tokenizer, tiny_units
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ssah_peft import SSAHConfig, SSAHLayer, export_lora, export_merged, models
from ssah_peft.cli import main
from ssah_peft.export import lora as lora_format

FAMILIES = ("llama", "qwen2", "gpt2", "phi3")  # plain, biases, Conv1D, fused qkv_proj / gate_up_proj
CASES = [(family, mode) for family in FAMILIES for mode in ("protect", "select")]
INPUT_IDS = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
ALPHA = 12.0


def adapted_layers(model: torch.nn.Module) -> dict[str, SSAHLayer]:
    """The SSAH layers of a ``PeftModel`` by their name in the base model."""
    return {name: module for name, module in model.base_model.model.named_modules() if isinstance(module, SSAHLayer)}


def logical(weight: torch.Tensor, layer: SSAHLayer) -> torch.Tensor:
    """A weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    return weight.T if layer.fan_in_fan_out else weight


def slice_of(weight: torch.Tensor, layer: SSAHLayer) -> torch.Tensor:
    """The slices the layer's index names: rows (axis ``out``) or columns (axis ``in``) of an ``[out, in]`` weight."""
    dim = 0 if layer.ssah_axis["default"] == "out" else 1
    return weight.index_select(dim, layer.ssah_index["default"].long())


class Case:
    """One SSAH adapter on a tiny model, its base weights and logits, and its LoRA export."""

    def __init__(self, family: str, mode: str, root: Path) -> None:
        self.family, self.mode = family, mode
        base = tiny_model(family)
        self.base_dir = root / f"{family}-{mode}-base"
        base.save_pretrained(self.base_dir)
        self.base_state = {key: value.clone() for key, value in base.state_dict().items()}
        config = SSAHConfig(units=tiny_units(), mode=mode, r=4, alpha=ALPHA, init_weights=False)
        self.model = get_peft_model(base, config).eval()  # init_weights=False: B non-zero in protected rows too
        with torch.no_grad():
            self.logits = self.model(INPUT_IDS).logits
        self.layers = adapted_layers(self.model)
        self.lora_dir = export_lora(self.model, root / f"{family}-{mode}-lora")
        self.settings = json.loads((self.lora_dir / "adapter_config.json").read_text())
        # with lora_bias, peft gives every module a LoRA bias, which it cannot merge into a layer without a bias
        self.mergeable = not self.settings["lora_bias"] or all(
            layer.get_base_layer().bias is not None for layer in self.layers.values()
        )


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Case]:
    """Every case exported, then loaded in ONE fresh process that never imports ssah_peft (logits, merged weights)."""
    root = tmp_path_factory.mktemp("export")
    built = {case: Case(*case, root) for case in CASES}
    torch.save(INPUT_IDS, root / "input_ids.pt")
    manifest = {
        f"{family}-{mode}": [str(case.base_dir), str(case.lora_dir), case.mergeable]
        for (family, mode), case in built.items()
    }
    script = textwrap.dedent(
        """
        import json, sys, torch, warnings
        import peft, transformers
        manifest, root = json.loads(sys.argv[1]), sys.argv[2]
        input_ids = torch.load(root + "/input_ids.pt")
        for key, (base_dir, lora_dir, merge) in manifest.items():
            base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
            model = peft.PeftModel.from_pretrained(base, lora_dir).eval()
            assert type(model.base_model).__name__ == "LoraModel", type(model.base_model)
            with torch.no_grad():
                torch.save(model(input_ids).logits, f"{root}/{key}-logits.pt")
            if merge:
                merged = model.merge_and_unload(safe_merge=True)
                torch.save({k: v.clone() for k, v in merged.state_dict().items()}, f"{root}/{key}-merged.pt")
        print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "ssah_peft")))
        """
    )
    environment = {**os.environ, "SSAH_PEFT_NO_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(manifest), str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []  # plain peft did it all
    for (family, mode), case in built.items():
        case.reloaded_logits = torch.load(root / f"{family}-{mode}-logits.pt")
        merged = root / f"{family}-{mode}-merged.pt"
        case.merged_state = torch.load(merged) if merged.exists() else None
    return built


@pytest.mark.parametrize("family,mode", CASES)
def test_plain_peft_loads_the_export_and_gives_the_same_logits(cases: dict, family: str, mode: str) -> None:
    case = cases[family, mode]
    assert (case.reloaded_logits - case.logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family,mode", CASES)
def test_the_export_is_a_plain_lora_config_naming_exactly_the_adapted_modules(
    cases: dict, family: str, mode: str
) -> None:
    case = cases[family, mode]
    settings = case.settings
    assert settings["peft_type"] == "LORA" and settings["bias"] == "none" and not settings["use_rslora"]
    assert settings["target_modules"] == sorted(case.layers)  # exact names, not suffixes
    assert settings["fan_in_fan_out"] == (family == "gpt2")
    assert settings["rank_pattern"] == {} and settings["alpha_pattern"] == {} and settings["modules_to_save"] is None
    assert settings["base_model_name_or_path"] == case.model.peft_config["default"].base_model_name_or_path
    fused = {"phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj"), "gpt2": ("attn.c_attn", "mlp.c_fc")}
    for module in fused.get(family, ()):
        assert any(name.endswith(f".0.{module}") for name in settings["target_modules"]), module
    tensors = load_file(case.lora_dir / "adapter_model.safetensors")
    if mode == "protect":
        assert settings["r"] == 4 and settings["lora_alpha"] == ALPHA and not settings["lora_bias"]
    else:  # one rank for all modules, the most slices a module selects; scale 1
        needed = max(layer.ssah_index["default"].numel() for layer in case.layers.values())
        assert settings["r"] == settings["lora_alpha"] == needed
        trains_bias = any("default" in layer.ssah_bias for layer in case.layers.values())
        assert settings["lora_bias"] == trains_bias == (family in ("qwen2", "gpt2"))
    expected = {f"base_model.model.{name}.lora_{ab}.weight" for name in case.layers for ab in "AB"}
    if settings["lora_bias"]:
        expected |= {f"base_model.model.{name}.lora_B.bias" for name in case.layers}
    assert set(tensors) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_the_merged_export_leaves_protected_slices_bit_identical(cases: dict, family: str) -> None:
    case = cases[family, "protect"]
    merged = case.merged_state
    for key, value in case.base_state.items():
        module = key.removesuffix(".weight")
        if module not in case.layers:  # not adapted (fully protected weights included): unchanged
            assert torch.equal(merged[key], value), key
            continue
        layer = case.layers[module]
        before, after = logical(value, layer), logical(merged[key], layer)
        assert torch.equal(slice_of(after, layer), slice_of(before, layer)), key
        assert not torch.equal(after, before), f"{key}: the trainable part did not change"


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])  # qwen2: biases on some modules only (see Case)
def test_a_select_export_merges_bit_identically_to_the_ssah_merge(cases: dict, family: str) -> None:
    case = cases[family, "select"]
    ssah_merged = get_peft_model(tiny_model(family), SSAHConfig(units=tiny_units(), mode="select", r=4, alpha=ALPHA))
    ssah_merged.load_state_dict(case.model.state_dict())
    ssah_state = ssah_merged.merge_and_unload().state_dict()
    for key, value in case.merged_state.items():
        assert torch.equal(value, ssah_state[key]), key


def test_a_select_export_with_trained_biases_puts_them_on_the_selected_rows(cases: dict) -> None:
    case = cases["qwen2", "select"]
    tensors = load_file(case.lora_dir / "adapter_model.safetensors")
    biased = 0
    for name, layer in case.layers.items():
        bias = tensors[f"base_model.model.{name}.lora_B.bias"]
        if "default" in layer.ssah_bias:
            index = layer.ssah_index["default"].long()
            assert torch.equal(bias[index], layer.ssah_bias["default"].detach())
            bias = bias.index_fill(0, index, 0.0)
            biased += 1
        assert not bias.any(), name
    assert biased > 0


# ------------------------------------------------------------------------------------------------------
# What an export refuses, and the folder it writes
# ------------------------------------------------------------------------------------------------------


def protect_model(family: str = "llama", **options) -> PeftModel:
    config = SSAHConfig(units=tiny_units(), mode="protect", r=4, init_weights=False, **options)
    return get_peft_model(tiny_model(family), config).eval()


def select_model() -> PeftModel:
    return get_peft_model(tiny_model("llama"), SSAHConfig(units=tiny_units(), mode="select", init_weights=False))


def test_values_in_protected_slices_never_reach_the_export_but_a_broken_value_is_refused(tmp_path: Path) -> None:
    model = protect_model()
    layers = adapted_layers(model)
    rows, columns = layers["model.layers.0.self_attn.v_proj"], layers["model.layers.0.mlp.down_proj"]
    assert rows.ssah_axis["default"] == "out" and columns.ssah_axis["default"] == "in"
    with torch.no_grad():
        rows.ssah_B["default"][rows.ssah_index["default"].long()] = float("inf")
        columns.ssah_A["default"][:, columns.ssah_index["default"].long()] = float("nan")
    tensors = load_file(export_lora(model, tmp_path / "ok") / "adapter_model.safetensors")
    lora_B = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    lora_A = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not slice_of(lora_B, rows).any() and not slice_of(lora_A, columns).any()
    keep = torch.ones(columns.in_features, dtype=torch.bool)
    keep[columns.ssah_index["default"].long()] = False
    with torch.no_grad():
        columns.ssah_A["default"][0, keep.nonzero()[0]] = float("nan")  # a trainable entry
    for export in (export_lora, export_merged):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.ssah_A of adapter 'default' holds 1 "):
            export(model, tmp_path / export.__name__)
        assert not (tmp_path / export.__name__).exists()


def test_select_above_the_maximum_rank_is_refused_and_offers_a_merged_export(tmp_path: Path) -> None:
    model = select_model()
    needed = max(layer.ssah_index["default"].numel() for layer in adapted_layers(model).values())
    with pytest.raises(ValueError) as error:
        export_lora(model, tmp_path / "too-large", max_rank=needed - 1)
    message = str(error.value)
    assert f"needs rank {needed}" in message and f"maximum rank {needed - 1}" in message
    assert "--format merged" in message and "export_merged" in message
    assert list(tmp_path.iterdir()) == []
    export_lora(model, tmp_path / "fits", max_rank=needed)
    assert json.loads((tmp_path / "fits" / "adapter_config.json").read_text())["r"] == needed


def test_modules_to_save_are_refused_for_lora_and_merged_into_a_checkpoint(tmp_path: Path) -> None:
    model = protect_model(modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=r"modules_to_save: \['lm_head'\].*vLLM refuses.*--format merged"):
        export_lora(model, tmp_path / "lora")
    assert list(tmp_path.iterdir()) == []
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(0.5)
        logits = model(INPUT_IDS).logits
    merged = AutoModelForCausalLM.from_pretrained(export_merged(model, tmp_path / "merged"))
    with torch.no_grad():
        assert (merged(INPUT_IDS).logits - logits).abs().max() <= 1e-5


def test_a_merged_export_is_a_checkpoint_with_its_tokenizer_and_exact_protected_slices(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    base = tiny_chat_llama(tokenizer)
    base_state = {key: value.clone() for key, value in base.state_dict().items()}
    model = get_peft_model(base, SSAHConfig(units=tiny_units(), mode="protect", r=4, init_weights=False)).eval()
    layers = adapted_layers(model)
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    out = export_merged(model, tmp_path / "merged", tokenizer=tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        assert (merged(INPUT_IDS).logits - logits).abs().max() <= 1e-5
    state = merged.state_dict()
    for name, layer in layers.items():
        key = f"{name}.weight"
        assert torch.equal(slice_of(state[key], layer), slice_of(base_state[key], layer)), key


def test_a_merged_export_of_a_4bit_base_is_exact_on_the_dequantized_weights(tmp_path: Path, avx512bf16_cpu) -> None:
    tiny_model("llama", hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "base")  # bnb: 64 | dims
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    units = {0: {"mlp": list(range(0, 256, 9))}}
    model = get_peft_model(base, SSAHConfig(units=units, mode="protect", r=4, init_weights=False)).eval()
    down_proj = model.base_model.model.model.layers[0].mlp.down_proj
    dequantized = down_proj.get_base_weight().clone()
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    merged = AutoModelForCausalLM.from_pretrained(export_merged(model, tmp_path / "merged")).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    weight = merged.model.layers[0].mlp.down_proj.weight
    assert torch.equal(weight[:, units[0]["mlp"]], dequantized[:, units[0]["mlp"]])
    with torch.no_grad():
        assert (merged(INPUT_IDS).logits - logits).abs().max() <= 1e-5


def test_the_output_folder_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = protect_model()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is a folder that is not empty"):
        export_lora(model, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora_format, "safetensors_bytes", broken)
    for target, overwrite in ((tmp_path / "new", False), (out, True)):
        with pytest.raises(OSError, match="disk full"):
            export_lora(model, target, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left, nothing new
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    export_lora(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_lora(model, empty) == empty and (empty / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------
# ssah-peft export
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny chat Llama with its tokenizer, and SSAH adapters of it saved by save_pretrained."""
    root = tmp_path_factory.mktemp("export-cli")
    tokenizer = tiny_tokenizer()
    tiny_chat_llama(tokenizer).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for name, options in {
        "protect": dict(mode="protect", r=4),
        "select": dict(mode="select"),
        "modules_to_save": dict(mode="protect", modules_to_save=["lm_head"]),
    }.items():
        base = AutoModelForCausalLM.from_pretrained(root / "base")  # records the base path in the adapter
        config = SSAHConfig(units=tiny_units(), init_weights=False, **options)
        get_peft_model(base, config).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def adapted_logits(saved: dict[str, Path], adapter: str) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["base"]), saved[adapter]).eval()
    with torch.no_grad():
        return model(INPUT_IDS).logits


def test_cli_exports_lora_and_merged_end_to_end(saved: dict[str, Path], tmp_path: Path, capsys) -> None:
    lora_out, merged_out = tmp_path / "lora", tmp_path / "merged"
    argv = ["export", str(saved["protect"]), "--out"]
    assert main([*argv, str(lora_out), "--format", "lora", "--model", str(saved["base"])]) == 0
    assert main([*argv, str(merged_out), "--format", "merged"]) == 0  # the base model the adapter records
    assert capsys.readouterr().out.split() == ["wrote", str(lora_out), "wrote", str(merged_out)]
    expected = adapted_logits(saved, "protect")
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["base"]), lora_out).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_out).eval()
    with torch.no_grad():
        assert (lora(INPUT_IDS).logits - expected).abs().max() <= 1e-5
        assert (merged(INPUT_IDS).logits - expected).abs().max() <= 1e-5
    assert json.loads((lora_out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(saved["base"])
    assert (merged_out / "tokenizer.json").is_file()


def refused(capsys, argv: list[str], status: int) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_cli_refuses_before_loading_any_model(
    saved: dict[str, Path], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    message = refused(
        capsys, ["export", str(saved["select"]), "--format", "lora", "--out", str(out), "--max-rank", "2"], 1
    )
    assert message.startswith(f"ssah-peft: error: {saved['select']}: a LoRA export of this select-mode adapter")
    assert "above the maximum rank 2" in message and "--format merged" in message
    message = refused(capsys, ["export", str(saved["modules_to_save"]), "--format", "lora", "--out", str(out)], 1)
    assert "modules_to_save: ['lm_head']" in message and "--format merged" in message
    lora = tmp_path / "lora"
    export_lora(protect_model(), lora)
    message = refused(capsys, ["export", str(lora), "--format", "merged", "--out", str(out)], 1)
    assert f"{lora} is a LORA adapter, not an SSAH adapter" in message
    message = refused(capsys, ["export", str(saved["protect"]), "--format", "lora", "--out", str(lora)], 2)
    assert f"--out {lora} is a folder that is not empty" in message and "--overwrite" in message
    unrecorded = tmp_path / "unrecorded"
    protect_model().save_pretrained(unrecorded)  # made from a config: no base model path to record
    message = refused(capsys, ["export", str(unrecorded), "--format", "merged", "--out", str(out)], 2)
    assert f"adapter {unrecorded} does not record its base model; give it with --model" in message
    assert not out.exists()
