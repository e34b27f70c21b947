"""The SSAH tuner on every supported family: identity at init, exact protection, selection, merge, save/load."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAMILIES, tiny_model, tiny_units
from peft import PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import ssah_peft
from ssah_peft import SSAHConfig, SSAHLayer, UnitMap, UnitScores
from ssah_peft.scoring import model_fingerprint

MODES = ("select", "protect")
CASES = [(family, mode) for family in FAMILIES for mode in MODES]


def logical_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` whatever the storage (Conv1D stores ``[in, out]``)."""
    weight = module.weight.detach()
    return weight.T if isinstance(module, Conv1D) else weight


def train_steps(model: torch.nn.Module, input_ids: torch.Tensor, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def expected_slices(family: str, mode: str, layer: int, units: dict) -> dict[str, tuple[str, set[int]]]:
    """The slices the units own, re-derived row by row from the definitions (independent of ssah_peft.units)."""
    heads, head_dim = 4, 8
    kv_heads = {"gemma": 1, "gpt2": 4}.get(family, 2)
    group = heads // kv_heads
    mlp, attn = set(units[layer]["mlp"]), set(units[layer]["attn"])
    keep = any if mode == "protect" else all

    def head_rows(offset: int) -> set[int]:
        return {
            offset + r
            for r in range(heads * head_dim)
            if keep(r // head_dim * head_dim + d in attn for d in range(head_dim))
        }

    def kv_head_rows(offset: int) -> set[int]:
        rows = set()
        for r in range(kv_heads * head_dim):
            readers = [h * head_dim + d for h in range(heads) if h // group == r // head_dim for d in range(head_dim)]
            if keep(u in attn for u in readers):
                rows.add(offset + r)
        return rows

    def kv_channel_rows(offset: int) -> set[int]:
        rows = set()
        for r in range(kv_heads * head_dim):
            readers = [h * head_dim + r % head_dim for h in range(heads) if h // group == r // head_dim]
            if keep(u in attn for u in readers):
                rows.add(offset + r)
        return rows

    if family == "gpt2":
        return {
            "mlp.c_proj": ("in", mlp),
            "mlp.c_fc": ("out", mlp),
            "attn.c_proj": ("in", attn),
            "attn.c_attn": ("out", head_rows(0) | kv_head_rows(32) | kv_channel_rows(64)),
        }
    if family == "phi3":
        return {
            "mlp.down_proj": ("in", mlp),
            "mlp.gate_up_proj": ("out", mlp | {48 + u for u in mlp}),
            "self_attn.o_proj": ("in", attn),
            "self_attn.qkv_proj": ("out", head_rows(0) | kv_head_rows(32) | kv_channel_rows(48)),
        }
    return {
        "mlp.down_proj": ("in", mlp),
        "mlp.gate_proj": ("out", mlp),
        "mlp.up_proj": ("out", mlp),
        "self_attn.o_proj": ("in", attn),
        "self_attn.q_proj": ("out", head_rows(0)),
        "self_attn.k_proj": ("out", kv_head_rows(0)),
        "self_attn.v_proj": ("out", kv_channel_rows(0)),
    }


def slice_mask(shape: tuple[int, int], axis: str, rows_or_cols: set[int]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    index = torch.tensor(sorted(rows_or_cols), dtype=torch.long)
    if axis == "out":
        mask[index] = True
    else:
        mask[:, index] = True
    return mask


class Case:
    """One (family, mode): the base weights, the trained adapter, its save directory and logits."""

    def __init__(self, family: str, mode: str, root: Path, input_ids: torch.Tensor) -> None:
        self.family, self.mode = family, mode
        self.units = tiny_units()
        base = tiny_model(family)
        self.base_dir = root / f"{family}-{mode}-base"
        base.save_pretrained(self.base_dir)
        self.base_state = {k: v.clone() for k, v in base.state_dict().items()}
        self.base_modules = {n: logical_weight(m).clone() for n, m in base.named_modules() if hasattr(m, "weight")}
        with torch.no_grad():
            self.base_logits = base(input_ids).logits
        self.model = get_peft_model(base, SSAHConfig(units=self.units, mode=mode, r=4))
        with torch.no_grad():
            self.init_logits = self.model(input_ids).logits
        train_steps(self.model, input_ids)
        with torch.no_grad():
            self.logits = self.model(input_ids).logits
        self.adapter_dir = root / f"{family}-{mode}-adapter"
        self.model.save_pretrained(self.adapter_dir)
        # merged copy: effective weights of the adapted model
        self.merged = get_peft_model(tiny_model(family), SSAHConfig(units=self.units, mode=mode, r=4))
        self.merged.load_state_dict(self.model.state_dict())
        self.merged = self.merged.merge_and_unload()
        with torch.no_grad():
            self.merged_logits = self.merged(input_ids).logits


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Case]:
    root = tmp_path_factory.mktemp("ssah")
    input_ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.save(input_ids, root / "input_ids.pt")
    built = {case: Case(*case, root, input_ids) for case in CASES}
    # Reload every adapter in ONE fresh process that imports only peft and transformers: ssah_peft must be
    # registered by the autoload hook the package installs.
    manifest = {f"{f}/{m}": [str(c.base_dir), str(c.adapter_dir)] for (f, m), c in built.items()}
    script = textwrap.dedent(
        """
        import json, sys, torch
        import peft, transformers
        assert "ssah_peft" not in sys.modules or "peft" in sys.modules
        manifest, root = json.loads(sys.argv[1]), sys.argv[2]
        input_ids = torch.load(root + "/input_ids.pt")
        for key, (base_dir, adapter_dir) in manifest.items():
            base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
            model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
            with torch.no_grad():
                torch.save(model(input_ids).logits, root + "/" + key.replace("/", "-") + "-reloaded.pt")
        print("loaded", len(manifest))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(manifest), str(root)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for (family, mode), case in built.items():
        case.reloaded_logits = torch.load(root / f"{family}-{mode}-reloaded.pt")
    return built


@pytest.mark.parametrize("family,mode", CASES)
def test_identity_at_init(cases: dict, family: str, mode: str) -> None:
    case = cases[family, mode]
    assert torch.equal(case.init_logits, case.base_logits)


@pytest.mark.parametrize("family,mode", CASES)
def test_training_changes_exactly_the_allowed_slices(cases: dict, family: str, mode: str) -> None:
    case = cases[family, mode]
    merged_modules = dict(case.merged.named_modules())
    adapted = 0
    for layer in range(2):
        for relative, (axis, owned) in expected_slices(family, mode, layer, case.units).items():
            name = f"{'transformer.h' if family == 'gpt2' else 'model.layers'}.{layer}.{relative}"
            before, after = case.base_modules[name], logical_weight(merged_modules[name])
            changed = after != before
            mask = slice_mask(tuple(before.shape), axis, owned)
            if mode == "protect":
                assert not changed[mask].any(), f"{name}: a protected slice changed"
                if not mask.all():
                    assert changed[~mask].float().mean() > 0.5, f"{name}: the trainable part did not train"
            else:
                assert not changed[~mask].any(), f"{name}: a slice outside the selection changed"
                if owned:
                    assert changed[mask].float().mean() > 0.5, f"{name}: the selected slices did not train"
                    adapted += 1
    assert mode == "protect" or adapted > 0
    # everything outside the adapted projections is untouched, biases of unselected rows included
    merged_state = case.merged.state_dict()
    for key, value in case.base_state.items():
        if key.endswith(".weight") and any(p in key for p in ("proj", "c_fc", "c_attn")):
            continue
        if (
            key.endswith(".bias")
            and mode == "select"
            and any(p in key for p in ("q_proj", "k_proj", "v_proj", "c_attn", "c_fc"))
        ):
            continue  # select mode trains the bias entries of the selected rows; checked below
        assert torch.equal(merged_state[key], value), key


def test_select_trains_only_the_bias_entries_of_selected_rows(cases: dict) -> None:
    case = cases["qwen2", "select"]
    merged = case.merged.state_dict()
    for layer in range(2):
        for relative, (_axis, owned) in expected_slices("qwen2", "select", layer, case.units).items():
            key = f"model.layers.{layer}.{relative}.bias"
            if key not in case.base_state:
                continue
            changed = merged[key] != case.base_state[key]
            rows = torch.zeros_like(changed)
            rows[sorted(owned)] = True
            assert not changed[~rows].any()
            if owned:
                assert changed[rows].all()


@pytest.mark.parametrize("family,mode", CASES)
def test_merged_logits_equal_unmerged(cases: dict, family: str, mode: str) -> None:
    case = cases[family, mode]
    assert (case.merged_logits - case.logits).abs().max() <= 1e-5
    assert not torch.equal(case.logits, case.base_logits)  # training did something


@pytest.mark.parametrize("family,mode", CASES)
def test_fresh_process_reload_gives_same_logits(cases: dict, family: str, mode: str) -> None:
    case = cases[family, mode]
    torch.testing.assert_close(case.reloaded_logits, case.logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,mode", CASES)
def test_adapter_file_holds_only_deltas_and_int32_indices(cases: dict, family: str, mode: str) -> None:
    case = cases[family, mode]
    path = case.adapter_dir / "adapter_model.safetensors"
    tensor_bytes = 0
    with safe_open(path, "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            tensor_bytes += tensor.numel() * tensor.element_size()
            kind = key.rsplit(".", 1)[-1] if key.endswith(("ssah_delta", "ssah_bias", "ssah_A", "ssah_B")) else None
            if key.endswith("ssah_index"):
                assert tensor.dtype == torch.int32
            else:
                assert kind is not None, f"unexpected tensor {key}"
    expected = sum(p.numel() * p.element_size() for n, p in case.model.named_parameters() if p.requires_grad)
    expected += sum(b.numel() * 4 for n, b in case.model.named_buffers() if "ssah_index" in n)
    assert tensor_bytes == expected
    assert path.stat().st_size <= 1.02 * tensor_bytes + 16 * 1024
    saved = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SSAH" and saved["mode"] == mode
    config = PeftConfig.from_pretrained(case.adapter_dir)
    assert isinstance(config, SSAHConfig) and config.units == SSAHConfig(units=case.units).units


def test_disable_unload_and_several_adapters(input_ids: torch.Tensor) -> None:
    base = tiny_model("llama")
    with torch.no_grad():
        reference = base(input_ids).logits
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, SSAHConfig(units=tiny_units(0), mode="select", init_weights=False))
    model.add_adapter("guard", SSAHConfig(units=tiny_units(1), mode="protect", r=2, init_weights=False))
    with torch.no_grad():
        first = model(input_ids).logits
        model.set_adapter("guard")
        second = model(input_ids).logits
        assert not torch.equal(first, second) and not torch.equal(first, reference)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".guard" in n for n in trainable)
        with model.disable_adapter():
            assert torch.equal(model(input_ids).logits, reference)
        model.delete_adapter("default")
        assert "default" not in model.peft_config
        assert all("default" not in n for n, _ in model.named_parameters())
        assert torch.equal(model(input_ids).logits, second)
    unloaded = model.unload()
    assert not any(isinstance(m, SSAHLayer) for m in unloaded.modules())
    for key, value in unloaded.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_merge_unmerge_round_trip(input_ids: torch.Tensor) -> None:
    model = get_peft_model(tiny_model("gpt2"), SSAHConfig(units=tiny_units(), mode="select", init_weights=False))
    with torch.no_grad():
        adapted = model(input_ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids).logits, adapted, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids).logits, adapted, rtol=0, atol=1e-6)


def test_trainable_parameter_count_is_the_unit_budget() -> None:
    units = {0: {"mlp": [1, 2, 3]}}
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units=units, mode="select"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 3 * 32 * 3  # gate rows + up rows + down columns of 3 neurons, hidden 32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_deltas_with_autocast(input_ids: torch.Tensor, dtype: str) -> None:
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units=tiny_units(), mode="protect", delta_dtype=dtype))
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all(p.dtype == getattr(torch, dtype) for p in params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_bf16_base_gets_fp32_deltas_by_default(input_ids: torch.Tensor) -> None:
    model = get_peft_model(tiny_model("qwen2").to(torch.bfloat16), SSAHConfig(units=tiny_units(), mode="select"))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model(input_ids).logits.dtype == torch.bfloat16


def test_transformers_load_adapter(cases: dict, input_ids: torch.Tensor) -> None:
    case = cases["llama", "protect"]
    base = tiny_model("llama")
    base.load_adapter(str(case.adapter_dir), adapter_name="ssah")
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids).logits, case.logits, rtol=0, atol=1e-6)


def test_explicit_architecture_for_an_unlisted_model(input_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    model.config.model_type = "my_llama_fork"
    with pytest.raises(NotImplementedError, match="no architecture entry"):
        get_peft_model(model, SSAHConfig(units={0: {"mlp": [1]}}, mode="select"))
    spec = ssah_peft.ArchitectureSpec(
        layers="layers",
        blocks={"mlp": ssah_peft.BlockSpec("mlp.down_proj", (ssah_peft.ProjectionPart("mlp.up_proj"),))},
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    config = SSAHConfig(units={0: {"mlp": [1]}}, mode="select", target_blocks=["mlp"], architecture=spec.to_dict())
    model = get_peft_model(model, config)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, SSAHLayer)) == [
        "base_model.model.model.layers.0.mlp.down_proj",
        "base_model.model.model.layers.0.mlp.up_proj",
    ]


def test_layers_to_transform_and_target_blocks() -> None:
    units = {0: {"mlp": [1], "attn": [2]}, 1: {"mlp": [3], "attn": [4]}}
    config = SSAHConfig(units=units, mode="protect", layers_to_transform=1, target_blocks=["attn"])
    model = get_peft_model(tiny_model("mistral"), config)
    adapted = {n.split("model.layers.")[1] for n, m in model.named_modules() if isinstance(m, SSAHLayer)}
    assert adapted == {f"1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}


# ------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing corrupted
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "units,message",
    [
        ({0: {"mlp": [1, 1]}}, "duplicate"),
        ({0: {"mlp": [-1]}}, "negative"),
        ({-1: {"mlp": [1]}}, "negative layer"),
        ({0: {"ffn": [1]}}, "unknown block kind"),
        ({0: {"mlp": [0.5]}}, "integer"),
        ({0: {"mlp": []}}, "nothing|no units"),
    ],
)
def test_config_rejects_malformed_units(units: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        SSAHConfig(units=units, mode="select")


@pytest.mark.parametrize(
    "units,mode,message",
    [
        ({2: {"mlp": [1]}}, "select", "model has 2 layers"),
        ({0: {"mlp": [48]}}, "select", "block has 48 units"),
        ({0: {"attn": [32]}}, "protect", "block has 32 units"),
        ({i: {"mlp": list(range(48)), "attn": list(range(32))} for i in range(2)}, "protect", "protects every unit"),
    ],
)
def test_units_that_do_not_fit_the_model(units: dict, mode: str, message: str) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, SSAHConfig(units=units, mode=mode))
    assert not any(isinstance(m, SSAHLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_select_with_no_units_in_targeted_layers() -> None:
    config = SSAHConfig(units={0: {"mlp": [1]}}, mode="select", layers_to_transform=[1])
    with pytest.raises(ValueError, match="nothing to train"):
        get_peft_model(tiny_model("llama"), config)


def test_loading_into_a_model_of_other_shapes_fails_cleanly(cases: dict) -> None:
    other = tiny_model("llama", intermediate_size=64)
    with pytest.raises(ValueError, match="was made for a base model with shapes"):
        PeftModel.from_pretrained(other, cases["llama", "select"].adapter_dir)
    assert not any(isinstance(m, SSAHLayer) for m in other.modules())


@pytest.mark.parametrize("mode", MODES)
def test_modules_to_save_and_low_cpu_mem_usage_loading(tmp_path: Path, input_ids: torch.Tensor, mode: str) -> None:
    config = SSAHConfig(units=tiny_units(), mode=mode, init_weights=False, modules_to_save=["lm_head"])
    model = get_peft_model(tiny_model("qwen2"), config)
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert head.requires_grad
    with torch.no_grad():
        head.add_(0.1)
        reference = model(input_ids).logits
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.lm_head.weight" in set(f.keys())
    reloaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in reloaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, reference, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Config values of the wrong type or range: a clear error at construction
# ------------------------------------------------------------------------------------------------------

ALPHA_ERROR = "alpha must be a finite number > 0 (protect mode scales its update by alpha / r), got "


@pytest.mark.parametrize(
    "options,message",
    [
        ({"alpha": float("nan")}, ALPHA_ERROR + "nan"),
        ({"alpha": float("inf")}, ALPHA_ERROR + "inf"),
        ({"alpha": 0}, ALPHA_ERROR + "0"),
        ({"alpha": -8.0}, ALPHA_ERROR + "-8.0"),
        ({"alpha": "32"}, ALPHA_ERROR + "'32' (str)"),
        ({"alpha": True}, ALPHA_ERROR + "True (bool)"),
        ({"r": 2.5}, "r must be a positive integer (the rank of protect mode's update), got 2.5 (float)"),
        ({"r": "8"}, "r must be a positive integer (the rank of protect mode's update), got '8' (str)"),
        ({"r": True}, "r must be a positive integer (the rank of protect mode's update), got True (bool)"),
        ({"r": 0}, "r must be a positive integer (the rank of protect mode's update), got 0"),
        ({"dropout": "0.1"}, "dropout must be a number in [0, 1), got '0.1' (str)"),
        ({"dropout": None}, "dropout must be a number in [0, 1), got None (NoneType)"),
        ({"dropout": float("nan")}, "dropout must be a number in [0, 1), got nan"),
        ({"dropout": 1.0}, "dropout must be a number in [0, 1), got 1.0"),
        ({"layers_to_transform": [0, 1.5]}, "layers_to_transform must hold integer layer indices; got 1.5 (float)"),
    ],
)
def test_config_rejects_hyperparameters_of_the_wrong_type_or_range(options: dict, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        SSAHConfig(units={0: {"mlp": [1]}}, mode="protect", **options)


@pytest.mark.parametrize(
    "units,message",
    [
        ({0: {"mlp": "3"}}, "units[0]['mlp'] must be a list of integer unit indices, got the string '3'"),
        ({0: {"mlp": None}}, "units[0]['mlp'] must be a list of integer unit indices, got None"),
        ({0: {"mlp": ["3"]}}, "units[0]['mlp'] must hold integer unit indices; item 0 is '3' (str)"),
        ({0: {"mlp": [1, 2.0]}}, "units[0]['mlp'] must hold integer unit indices; item 1 is 2.0 (float)"),
        ({0: {"mlp": [True]}}, "units[0]['mlp'] must hold integer unit indices; item 0 is True (bool)"),
        ({0: {"mlp": [[1, 2], [3]]}}, "units[0]['mlp'] must hold integer unit indices; item 0 is [1, 2] (list)"),
        ({0: {"mlp": torch.tensor([[1, 2]])}}, "units[0]['mlp'] must be a flat list of unit indices, got a 2-d tensor"),
        ({0: {"mlp": np.array([1.0, 2.0])}}, "units[0]['mlp'] must hold integer unit indices, got an array of float64"),
        ({1.5: {"mlp": [1]}}, "units: layer key 1.5 is not an integer"),
        ({True: {"mlp": [1]}}, "units: layer key True is not an integer"),
    ],
)
def test_config_rejects_unit_indices_of_the_wrong_type(units: dict, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        SSAHConfig(units=units, mode="select")


def test_config_normalises_integer_likes_to_plain_json_values(tmp_path: Path) -> None:
    units = {np.int64(0): {"mlp": np.array([5, 1]), "attn": torch.tensor([3])}, "1": {"mlp": range(2), "attn": (4,)}}
    config = SSAHConfig(units=units, mode="protect", r=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.1))
    assert config.units == {"0": {"mlp": [1, 5], "attn": [3]}, "1": {"mlp": [0, 1], "attn": [4]}}
    assert (config.r, config.alpha, config.dropout) == (4, 8.0, 0.1)
    assert type(config.r) is int and type(config.alpha) is float and type(config.dropout) is float
    config.save_pretrained(tmp_path)  # plain JSON values
    assert PeftConfig.from_pretrained(tmp_path).r == 4


# ------------------------------------------------------------------------------------------------------
# A unit map's fingerprint travels with the config and is checked against the model at injection
# ------------------------------------------------------------------------------------------------------


def unit_map_for(fingerprint: dict, seed: int = 0) -> UnitMap:
    """A map with random scores for the model ``fingerprint`` describes."""
    generator = torch.Generator().manual_seed(seed)

    def scores() -> UnitScores:
        values = {
            kind: tuple(torch.rand(width, generator=generator, dtype=torch.float64) for width in widths)
            for kind, widths in fingerprint["widths"].items()
        }
        return UnitScores(scores=values, method="variance", num_tokens=10, num_sequences=2, fingerprint=fingerprint)

    return UnitMap.from_scores(scores(), scores(), scu=0.05, ucu=0.1, ru=0.2)


@pytest.mark.parametrize("mode", MODES)
def test_a_unit_map_of_a_narrower_model_is_refused_although_its_indices_fit(mode: str) -> None:
    model = tiny_model("llama")  # MLP blocks 48 wide
    own = model_fingerprint(model)
    narrower = {**own, "widths": {**own["widths"], "mlp": [40, 40]}}  # every index < 40 exists in the 48-wide MLP
    config = SSAHConfig(units=unit_map_for(narrower), mode=mode)
    assert config.unit_map_fingerprint == narrower
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as refused:
        get_peft_model(model, config)
    message = str(refused.value)
    assert message.startswith("This unit map was computed for a model with model_type='llama', 2 layers")
    assert "'mlp': [40, 40]" in message.split("but the model has")[0]  # the model the map was made for
    assert "'mlp': [48, 48]" in message.split("but the model has")[1]  # the model it got
    assert "Score this model instead" in message  # what to do
    assert not any(isinstance(m, SSAHLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_unit_map_of_another_model_type_is_refused_at_creation_and_at_load(tmp_path: Path) -> None:
    mistral_map = unit_map_for(model_fingerprint(tiny_model("mistral")))  # same shapes as the tiny llama
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match="for a model with model_type='mistral'.*but the model has model_type='llama'"):
        get_peft_model(llama, SSAHConfig(units=mistral_map, mode="select"))
    assert not any(isinstance(m, SSAHLayer) for m in llama.modules())

    # a map of the model itself: accepted, and its fingerprint is saved with the adapter and checked on load
    llama_map = unit_map_for(model_fingerprint(llama))
    model = get_peft_model(llama, SSAHConfig(units=llama_map, mode="select", init_weights=False))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["unit_map_fingerprint"] == llama_map.fingerprint
    assert PeftModel.from_pretrained(tiny_model("llama"), tmp_path).peft_config["default"].unit_map_fingerprint == (
        llama_map.fingerprint
    )
    mistral = tiny_model("mistral")
    with pytest.raises(ValueError, match="for a model with model_type='llama'.*but the model has model_type='mistral'"):
        PeftModel.from_pretrained(mistral, tmp_path)
    assert not any(isinstance(m, SSAHLayer) for m in mistral.modules())
    # plain units carry no fingerprint and work as before
    assert SSAHConfig(units=tiny_units(), mode="select").unit_map_fingerprint is None


# ------------------------------------------------------------------------------------------------------
# Loading: the slice indices in adapter_model.safetensors must agree with the units of adapter_config.json
# ------------------------------------------------------------------------------------------------------

DOWN_0 = "base_model.model.model.layers.0.mlp.down_proj"


def save_select_adapter(directory: Path, units: dict, **options) -> Path:
    config = SSAHConfig(units=units, mode="select", init_weights=False, **options)
    get_peft_model(tiny_model("llama"), config).save_pretrained(directory)
    return directory


def edit_adapter_weights(directory: Path, edit) -> None:
    path = directory / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def disagreeing_adapter(root: Path, case: str) -> tuple[Path, str]:
    """An adapter whose weights file and config disagree on the slices, and a regex of the error it must raise."""
    directory = save_select_adapter(root / case, tiny_units(0), layers_to_transform=[0])
    if case == "interrupted":  # the weights of a newer save with other units (same counts), the config of the old
        newer = save_select_adapter(root / "newer", tiny_units(1), layers_to_transform=[0])
        shutil.copy(newer / "adapter_model.safetensors", directory / "adapter_model.safetensors")
        return directory, r"disagree on the slices of .*model\.layers\.0\.(mlp|self_attn)\."
    stored = load_file(directory / "adapter_model.safetensors")[DOWN_0 + ".ssah_index"]
    if case == "edited":
        edit_adapter_weights(directory, lambda t: t.update({DOWN_0 + ".ssah_index": stored.flip(0).contiguous()}))
        expected = re.escape(f"stores the indices {stored.flip(0).tolist()}, the config's units give {stored.tolist()}")
        return directory, rf"disagree on the slices of {re.escape(DOWN_0)} .*{expected}"
    if case == "shorter":
        edit_adapter_weights(directory, lambda t: t.update({DOWN_0 + ".ssah_index": stored[1:].contiguous()}))
        return directory, rf"on the slices of {re.escape(DOWN_0)} .*stores 5 indices, the config's units give 6"
    if case == "missing":
        edit_adapter_weights(directory, lambda t: t.pop(DOWN_0 + ".ssah_index"))
        return directory, rf"stores no slice indices for {re.escape(DOWN_0)}, which adapter_config.json's units adapt"
    assert case == "extra"  # indices of a module the config does not adapt (layer 1 is not transformed)
    extra = DOWN_0.replace("layers.0", "layers.1")
    edit_adapter_weights(directory, lambda t: t.update({extra + ".ssah_index": stored.clone()}))
    return directory, rf"stores slice indices for {re.escape(extra)}, which adapter_config.json's units do not adapt"


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("case", ["interrupted", "edited", "shorter", "missing", "extra"])
@pytest.mark.parametrize("how", ["from_pretrained", "low_cpu_mem_usage", "load_adapter", "inject_adapter_in_model"])
def test_peft_loading_refuses_weights_that_disagree_with_the_config(
    tmp_path: Path, input_ids: torch.Tensor, case: str, how: str
) -> None:
    directory, message = disagreeing_adapter(tmp_path, case)
    saved = files_of(directory)
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    if how == "load_adapter":  # into a model that already holds an adapter, which must keep working
        model = PeftModel.from_pretrained(base, save_select_adapter(tmp_path / "good", tiny_units(2)))
        with torch.no_grad():
            reference = model(input_ids).logits
        with pytest.raises(ValueError, match=message):
            model.load_adapter(directory, adapter_name="other")
        assert list(model.peft_config) == ["default"]
        assert not any("other" in name for name in model.state_dict())
        with torch.no_grad():
            assert torch.equal(model(input_ids).logits, reference)
    elif how == "inject_adapter_in_model":  # peft's functions for models without a PeftModel wrapper
        inject_adapter_in_model(PeftConfig.from_pretrained(directory), base)
        with pytest.raises(
            ValueError, match=message.replace(re.escape("base_model.model."), "(base_model\\.model\\.)?")
        ):
            set_peft_model_state_dict(base, load_peft_weights(directory))
        assert not any(isinstance(m, SSAHLayer) for m in base.modules()) and not hasattr(base, "peft_config")
    else:
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(base, directory, low_cpu_mem_usage=how == "low_cpu_mem_usage")
        assert not any(isinstance(m, SSAHLayer) for m in base.modules()) and not hasattr(base, "peft_config")
        assert base.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert files_of(directory) == saved


@pytest.mark.parametrize("case", ["interrupted", "edited"])
def test_transformers_load_adapter_refuses_weights_that_disagree_with_the_config(tmp_path: Path, case: str) -> None:
    directory, message = disagreeing_adapter(tmp_path, case)
    saved = files_of(directory)
    base = tiny_model("llama")
    # transformers loads the weights itself, one tensor at a time, and names modules without peft's prefix
    with pytest.raises(ValueError, match=message.replace(re.escape("base_model.model."), "")):
        base.load_adapter(str(directory), adapter_name="ssah")
    assert files_of(directory) == saved


def test_loading_a_consistent_adapter_checks_and_passes(tmp_path: Path, input_ids: torch.Tensor) -> None:
    units = tiny_units(3)
    config = SSAHConfig(units=units, mode="protect", r=2, init_weights=False)
    model = get_peft_model(tiny_model("llama"), config)
    with torch.no_grad():
        reference = model(input_ids).logits
    model.save_pretrained(tmp_path)
    for reloaded in (PeftModel.from_pretrained(tiny_model("llama"), tmp_path, low_cpu_mem_usage=True),):
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids).logits, reference, rtol=0, atol=1e-6)
    other = tiny_model("llama")
    other.load_adapter(str(tmp_path), adapter_name="ssah")
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids).logits, reference, rtol=0, atol=1e-6)
    # a state dict with the same indices loads; one with other indices is refused, naming the module
    state = model.state_dict()
    model.load_state_dict(state)
    key = next(k for k in state if k.endswith("ssah_index.default") and state[k].numel() > 1)
    state[key] = state[key].flip(0)
    with pytest.raises(ValueError, match=re.escape(key.removesuffix(".ssah_index.default"))):
        model.load_state_dict(state)
