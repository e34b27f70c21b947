"""QLoRA-style use on a bitsandbytes base (CPU): train, evaluate, merge lossy or into a dequantized copy."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ssah_peft import SSAHConfig, merge_and_dequantize

# dims are multiples of 64, as bitsandbytes' CPU kernels expect
SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
UNITS = {0: {"mlp": list(range(0, 256, 9)), "attn": list(range(32)) + [40]}, 1: {"mlp": [5, 6, 100]}}
QUANTIZATION = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import tiny_model

    path = tmp_path_factory.mktemp("fp32")
    tiny_model("llama", **SIZES).save_pretrained(path)
    return path


def quantized_peft_model(fp32_dir: Path, quantization: str):
    base = AutoModelForCausalLM.from_pretrained(
        fp32_dir, quantization_config=QUANTIZATION[quantization], device_map="cpu"
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    return get_peft_model(base, SSAHConfig(units=UNITS, mode="protect", r=4))


def down_proj(model, layer: int = 0):
    return model.base_model.model.model.layers[layer].mlp.down_proj


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_train_eval_then_merge(fp32_dir: Path, quantization: str, avx512bf16_cpu: None) -> None:
    fp32 = AutoModelForCausalLM.from_pretrained(fp32_dir).eval()
    model = quantized_peft_model(fp32_dir, quantization)
    input_ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantization_error = (model(input_ids).logits - fp32(input_ids).logits).abs().max()
    weight_before = down_proj(model).get_base_weight().clone()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)

    model.eval()  # the eval pass that repacks 4-bit weights on CPU unless prevented
    with torch.no_grad():
        unmerged = model(input_ids).logits
    assert torch.equal(down_proj(model).get_base_weight(), weight_before), "the eval pass changed the stored weight"
    states = [getattr(p, "quant_state", None) for p in model.parameters()]
    assert not any(getattr(state, "packing_format_for_cpu", False) for state in states), "the eval pass repacked"

    with pytest.warns(UserWarning, match="requantizes"):
        model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids).logits
    assert (merged - unmerged).abs().max() <= 2 * quantization_error
    protected_columns = torch.tensor(UNITS[0]["mlp"])
    layer_error = (weight_before - fp32.model.layers[0].mlp.down_proj.weight).abs().max()
    drift = (down_proj(model).get_base_weight() - weight_before)[:, protected_columns].abs().max()
    assert drift <= 2 * layer_error


def test_merge_into_dequantized_copy_is_exact(fp32_dir: Path, avx512bf16_cpu: None) -> None:
    model = quantized_peft_model(fp32_dir, "nf4")
    for _name, param in model.named_parameters():
        if param.requires_grad:
            with torch.no_grad():
                param.normal_(std=0.02)  # a trained-looking adapter
    input_ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids).logits
    dequantized_before = down_proj(model).get_base_weight().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no lossy-merge warning on this path
        merged = merge_and_dequantize(model)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    weight = merged.model.layers[0].mlp.down_proj.weight
    protected = torch.tensor(UNITS[0]["mlp"])
    assert torch.equal(weight[:, protected], dequantized_before[:, protected])
    assert not torch.equal(weight, dequantized_before)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted, rtol=0, atol=1e-4)


def test_merge_and_dequantize_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="SSAH"):
        merge_and_dequantize(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------
# bitsandbytes' CPU repacking, both paths on any CPU (see conftest.avx512bf16_cpu and helpers.repack_4bit_for_cpu)
# ----------------------------------------------------------------------------------------------------


def linear4bit_layers(model) -> dict[str, bnb.nn.Linear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_simulated_repack_is_what_an_eval_forward_does(fp32_dir: Path, avx512bf16_cpu: None, monkeypatch) -> None:
    from helpers import repack_4bit_for_cpu

    def load():
        return AutoModelForCausalLM.from_pretrained(fp32_dir, quantization_config=QUANTIZATION["nf4"], device_map="cpu")

    forwarded, simulated = load(), load()
    seen = []

    def matmul_4bit(x, weight, bias=None, quant_state=None):  # bitsandbytes' kernels are not needed to repack
        seen.append(bool(getattr(quant_state, "packing_format_for_cpu", False)))
        return torch.zeros(*x.shape[:-1], quant_state.shape[0], dtype=x.dtype)

    monkeypatch.setattr(bnb, "matmul_4bit", matmul_4bit)
    layers = linear4bit_layers(forwarded)
    assert layers and all(m.support_avx512bf16_for_cpu for m in layers.values())
    with torch.no_grad():
        forwarded.eval()(torch.randint(3, 97, (1, 5)))  # the eval-mode no-grad forward that repacks
    assert len(seen) == len(layers) and all(seen)
    assert sorted(repack_4bit_for_cpu(simulated)) == sorted(layers)
    assert repack_4bit_for_cpu(simulated) == []  # already repacked: nothing to do, like a second forward
    for name, layer in linear4bit_layers(simulated).items():
        by_forward = layers[name].weight
        assert torch.equal(layer.weight.data, by_forward.data)
        assert layer.weight.data.shape != layer.weight.quant_state.original_qshape  # the CPU layout, not the standard
        state, state_by_forward = layer.weight.quant_state, by_forward.quant_state
        assert state.packing_format_for_cpu and state_by_forward.packing_format_for_cpu
        assert state.dtype == state_by_forward.dtype == torch.bfloat16
        assert torch.equal(state.absmax, state_by_forward.absmax)


def test_disable_cpu_4bit_repacking_stops_and_undoes_the_repack(fp32_dir: Path, avx512bf16_cpu: None) -> None:
    from helpers import repack_4bit_for_cpu

    from ssah_peft import disable_cpu_4bit_repacking

    model = AutoModelForCausalLM.from_pretrained(fp32_dir, quantization_config=QUANTIZATION["nf4"], device_map="cpu")
    layers = linear4bit_layers(model)
    assert layers and all(m.support_avx512bf16_for_cpu for m in layers.values())  # armed, whatever this CPU is
    storage = {name: m.weight.data.clone() for name, m in layers.items()}
    dequantized = {
        name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) for name, m in layers.items()
    }
    input_ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))

    # switched off before the first forward: an eval forward leaves the storage and its dequantization unchanged
    disable_cpu_4bit_repacking(model)
    assert not any(m.support_avx512bf16_for_cpu for m in layers.values())
    with torch.no_grad():
        logits = model.eval()(input_ids).logits
    for name, m in layers.items():
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(m.weight.data, storage[name])
        assert torch.equal(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state), dequantized[name])

    # repacked already (as by an eval forward before the guard): converted back, block scales rounded to bf16
    assert sorted(repack_4bit_for_cpu(model)) == sorted(layers)
    with pytest.warns(UserWarning, match="already been repacked"):
        disable_cpu_4bit_repacking(model)
    for name, m in layers.items():
        assert not m.weight.quant_state.packing_format_for_cpu
        assert torch.equal(m.weight.data, storage[name])
        again = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        torch.testing.assert_close(again, dequantized[name], rtol=2**-8, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, logits, rtol=0, atol=0.05 * logits.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# The QLoRA recipe users run: NF4 with a bf16 compute dtype, prepare_model_for_kbit_training, train, merge
# ----------------------------------------------------------------------------------------------------

RECIPE = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama stored in bfloat16, as released checkpoints are (loaded in bf16 by default)."""
    from helpers import tiny_model

    path = tmp_path_factory.mktemp("bf16")
    tiny_model("llama", **SIZES).to(torch.bfloat16).save_pretrained(path)
    return path


def trained_qlora_model(path: Path, mode: str):
    """NF4 + bf16 compute, prepare_model_for_kbit_training, SSAH, three AdamW steps; returned in eval mode."""
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=RECIPE, device_map="cpu")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    torch.manual_seed(0)
    model = get_peft_model(base, SSAHConfig(units=UNITS, mode=mode, r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    input_ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(3):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def frozen_slices(layer, weight: torch.Tensor) -> torch.Tensor:
    """The entries of ``weight`` an SSAH layer's mode never changes: the protected slices (protect) or all but the
    selected ones (select)."""
    axis, index = layer.ssah_axis["default"], layer.ssah_index["default"].long()
    dim = 0 if axis == "out" else 1
    mask = torch.zeros(weight.shape[dim], dtype=torch.bool)
    mask[index] = True
    if layer.ssah_update["default"].mode == "select":
        mask = ~mask
    return weight.index_select(dim, mask.nonzero().flatten())


@pytest.mark.parametrize("checkpoint", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["protect", "select"])
def test_qlora_recipe_merges_into_a_bf16_model_that_runs_is_exact_and_reloads(
    request: pytest.FixtureRequest, tmp_path: Path, checkpoint: str, mode: str, avx512bf16_cpu: None
) -> None:
    from ssah_peft import SSAHLayer

    path = request.getfixturevalue(f"{checkpoint}_dir")
    model = trained_qlora_model(path, mode)
    layers = {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, SSAHLayer)}
    assert layers and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers.values())
    # prepare_model_for_kbit_training left the norms and embeddings in float32
    assert model.base_model.model.model.norm.weight.dtype == torch.float32
    bases = {name: m.get_base_weight().clone() for name, m in layers.items()}  # stored dtype: bf16 or fp32
    frozen = {name: frozen_slices(m, bases[name].to(torch.bfloat16)) for name, m in layers.items()}
    input_ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids).logits
        with model.disable_adapter():
            unadapted = model(input_ids).logits
    effect = (adapted - unadapted).abs().max()
    assert effect > 0.01  # the adapter was trained: the comparison below can tell a merged one from none

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # neither lossy nor already merged
        merged = merge_and_dequantize(model)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    with torch.no_grad():
        logits = merged(input_ids).logits
    # one dtype, the compute dtype the model was trained in, so it saves as a plain bf16 checkpoint
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    # within bfloat16 rounding of the adapted model, which keeps its norms and residual stream in float32 (measured:
    # up to 2.2% of the logit scale, depending on the CPU's bf16 kernels) ...
    difference = (logits.float() - adapted).abs().max()
    assert difference <= 2**-4 * adapted.abs().max(), (difference, adapted.abs().max())
    assert difference < effect / 8  # ... and the adapters' effect (40x larger here) is kept
    for name, layer in layers.items():
        weight = merged.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16
        # the frozen slices are the dequantized base weights (as the bf16 compute used them), bit for bit
        assert torch.equal(frozen_slices(layer, weight), frozen[name])
        assert not torch.equal(weight, bases[name].to(torch.bfloat16))

    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)


def test_merge_and_dequantize_dtype_argument(bf16_dir: Path, avx512bf16_cpu: None) -> None:
    from ssah_peft import SSAHLayer

    model = trained_qlora_model(bf16_dir, "protect")
    layers = {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, SSAHLayer)}
    bases = {name: m.get_base_weight().clone() for name, m in layers.items()}
    input_ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids).logits
    merged = merge_and_dequantize(model, dtype=torch.float32)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    for name, layer in layers.items():  # bf16 → fp32 is exact: still the dequantized base, bit for bit
        weight = merged.get_submodule(name).weight
        assert torch.equal(frozen_slices(layer, weight), frozen_slices(layer, bases[name].float()))
    with torch.no_grad():
        logits = merged(input_ids).logits
    assert (logits - adapted).abs().max() <= 2**-6 * adapted.abs().max()


def state_bytes_per_parameter(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> float:
    """Bytes of the trainable tensors, their gradients and the optimizer state, per trainable parameter."""
    count = sum(p.numel() for p in params)
    held = sum(p.numel() * p.element_size() * 2 for p in params)  # the tensor and its gradient, same dtype
    held += sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return held / count


def test_select_with_bf16_deltas_and_an_8bit_optimizer_stays_confined(input_ids: torch.Tensor) -> None:
    """The memory recipe for RU-only alignment of a large model: bf16 deltas (``delta_dtype``) and bitsandbytes'
    8-bit AdamW. The update stays confined to the selected slices, and the state per trainable parameter drops
    from 16 bytes (fp32 deltas, AdamW) to about 6 (2 delta + 2 gradient + 2 x 1 for the two 8-bit moments)."""
    from helpers import assert_update_confined, tiny_model

    # deltas of 32k entries each, so the optimizers' fixed per-tensor state (quantization maps, step counters)
    # weighs per parameter about what it weighs in a real model
    units = {0: {"mlp": list(range(0, 512, 2))}, 1: {"mlp": list(range(1, 512, 2)), "attn": list(range(64))}}
    costs = {}
    for recipe in ("fp32 AdamW", "bf16 AdamW8bit"):
        low_memory = recipe.startswith("bf16")
        base = tiny_model("llama", hidden_size=128, intermediate_size=512)
        original = {k: v.clone() for k, v in base.state_dict().items()}
        config = SSAHConfig(units=units, mode="select", delta_dtype="bfloat16" if low_memory else None)
        model = get_peft_model(base, config)
        params = [p for p in model.parameters() if p.requires_grad]
        assert {p.dtype for p in params} == {torch.bfloat16 if low_memory else torch.float32}
        if low_memory:
            optimizer = bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1)
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        model.train()
        for _ in range(3):
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep the gradients: they are part of the memory counted
        if low_memory:
            moments = [t for s in optimizer.state.values() for k, t in s.items() if k in ("state1", "state2")]
            assert moments and all(t.dtype == torch.uint8 for t in moments)
        assert all(p.float().abs().sum() > 0 for p in params)  # it trained
        assert_update_confined(model, "select")
        unloaded = model.unload()
        for key, value in unloaded.state_dict().items():
            assert torch.equal(value, original[key]), key
        costs[recipe] = state_bytes_per_parameter(params, optimizer)
    assert costs["fp32 AdamW"] == pytest.approx(16.0, abs=0.1)  # + a step counter per tensor
    print(f"bytes per trainable parameter: {costs}")
    assert costs["bf16 AdamW8bit"] <= 6.5, costs
