"""peft's rules for a tuner, checked on SSAH: every trainable parameter can change the model, and safe merges
check everything they write, with peft's own error text."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_update_confined, tiny_model
from peft import PeftModel, get_peft_model

from ssah_peft import SSAHConfig, SSAHLayer

# One protected channel in each of the 4 query heads: under GQA (2 kv heads) every query row (head sharing) and
# every key row (kv-head sharing) is read by a protected unit, so q_proj and k_proj are 100% protected, while
# v_proj (kv-channel sharing) keeps most rows trainable.
SCATTERED = {0: {"attn": [0, 8, 16, 24], "mlp": [3]}, 1: {"attn": [5]}}


def adapted_names(model: torch.nn.Module) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, SSAHLayer)}


def test_protect_mode_leaves_fully_protected_weights_unwrapped(tmp_path, input_ids: torch.Tensor) -> None:
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units=SCATTERED, mode="protect", r=2))
    adapted = adapted_names(model)
    assert "model.layers.0.self_attn.q_proj" not in adapted
    assert "model.layers.0.self_attn.k_proj" not in adapted
    for kept in (
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.q_proj",
    ):
        assert kept in adapted
    assert len(adapted) == 2 * 7 - 2

    # every trainable parameter gets a gradient that can move the model (peft's rule), none is dead weight
    with torch.no_grad():  # B starts at zero, so give it values for A's gradient to be non-zero
        for name, param in model.named_parameters():
            if "ssah_B" in name:
                param.normal_(std=0.02)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    counted, _ = model.get_nb_trainable_parameters()
    assert counted == sum(p.numel() for p in trainable.values())
    assert_update_confined(model, "protect")

    # the saved adapter reloads onto the same set of weights
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert adapted_names(reloaded) == adapted
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=1e-6)


def test_select_mode_still_wraps_fully_selected_weights() -> None:
    everything = {0: {"attn": list(range(32))}}
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units=everything, mode="select"))
    assert "model.layers.0.self_attn.q_proj" in adapted_names(model)


def break_one_bias(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    layer = next(m for m in model.modules() if isinstance(m, SSAHLayer) and "default" in m.ssah_bias)
    with torch.no_grad():
        layer.ssah_bias["default"][0] = float("nan")
    base = layer.get_base_layer()
    return base, base.weight.detach().clone(), base.bias.detach().clone()


def test_safe_merge_checks_the_bias_delta_and_writes_nothing() -> None:
    model = get_peft_model(
        tiny_model("qwen2"), SSAHConfig(units={0: {"attn": list(range(8))}}, mode="select", init_weights=False)
    )
    base, weight, bias = break_one_bias(model)
    with pytest.raises(
        ValueError, match=r"^NaNs detected in the merged weights\. The adapter default seems to be broken$"
    ):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(base.weight, weight) and torch.equal(base.bias, bias)
    assert torch.isfinite(base.bias).all()


def test_safe_merge_of_a_broken_weight_delta_uses_peft_wording() -> None:
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units={0: {"mlp": [1, 2]}}, mode="select"))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.ssah_delta["default"].fill_(float("inf"))
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError) as error:
        model.merge_adapter(safe_merge=True)
    # peft's LoRA says exactly this (no quotes around the name); tools match on it
    assert str(error.value) == "NaNs detected in the merged weights. The adapter default seems to be broken"
    assert torch.equal(layer.get_base_layer().weight, before)


def test_protected_slices_stay_exact_whatever_the_raw_tensors_hold(input_ids: torch.Tensor) -> None:
    """The mask is applied with ``where``, not a product: inf or nan written into the protected rows of B or
    columns of A (by an optimizer gone wrong, or by hand) still gives exactly zero update there."""
    base = tiny_model("llama")
    with torch.no_grad():
        reference = base(input_ids).logits
    # everything protected but MLP neuron 47 of layer 1: only gate/up/down of layer 1 stay wrapped
    units = {0: {"mlp": list(range(48)), "attn": list(range(32))}, 1: {"mlp": list(range(47)), "attn": list(range(32))}}
    model = get_peft_model(base, SSAHConfig(units=units, mode="protect", r=2))
    poisoned = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SSAHLayer):
                protected = module.ssah_index["default"].long()
                if module.ssah_axis["default"] == "out":
                    module.ssah_B["default"][protected] = float("nan")
                else:
                    module.ssah_A["default"][:, protected] = float("inf")
                poisoned += protected.numel()
    assert poisoned
    assert_update_confined(model, "protect")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    assert torch.isfinite(logits).all()
    # only neuron 47 of layer 1's MLP is trainable, and its B rows / A columns are still zero-initialised or
    # untouched: the model is the base model
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
