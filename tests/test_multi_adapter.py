"""peft's multi-adapter features on SSAH adapters: mixed batches (``adapter_names``), ``add_weighted_adapter``, and
the clear refusals of hotswapping and ``PeftMixedModel``."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, assert_update_confined, tiny_model, tiny_units
from peft import PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

from ssah_peft import SSAHConfig, SSAHLayer

# "a"/"b" would be substrings of the tuner's prefix "ssah_", which peft warns about
FIRST, SECOND = "first", "second"


def two_adapter_model(family: str, first_mode: str, second_mode: str, units: dict | None = None) -> PeftModel:
    """A tiny model with two non-identity SSAH adapters on the same units, in eval mode."""
    units = units if units is not None else tiny_units()
    torch.manual_seed(3)
    model = get_peft_model(
        tiny_model(family), SSAHConfig(units=units, mode=first_mode, r=4, init_weights=False), adapter_name=FIRST
    )
    model.add_adapter(SECOND, SSAHConfig(units=units, mode=second_mode, r=2, init_weights=False))
    return model.eval()


def batch(rows: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, 7), generator=torch.Generator().manual_seed(5))


def single_adapter_logits(model: PeftModel, input_ids: torch.Tensor, adapter: str) -> torch.Tensor:
    """The logits with only ``adapter`` active (``"__base__"``: with the adapters disabled)."""
    if adapter == "__base__":
        with model.disable_adapter():
            return model(input_ids).logits
    model.set_adapter(adapter)
    return model(input_ids).logits


# ------------------------------------------------------------------------------------------------------
# Mixed batches
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "first_mode", "second_mode"),
    [("llama", "protect", "select"), ("qwen2", "select", "protect"), ("gpt2", "protect", "select")],
)
def test_each_row_of_a_mixed_batch_gets_its_own_adapter(family: str, first_mode: str, second_mode: str) -> None:
    model = two_adapter_model(family, first_mode, second_mode)
    names = [FIRST, SECOND, "__base__", SECOND, FIRST]
    input_ids = batch(len(names))
    with torch.no_grad():
        mixed = model(input_ids, adapter_names=names).logits
        expected = {name: single_adapter_logits(model, input_ids, name) for name in set(names)}
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-6)
    # the adapters do change the output, so the rows above tell them apart
    assert (expected[FIRST] - expected["__base__"]).abs().max() > 1e-3
    assert (expected[SECOND] - expected["__base__"]).abs().max() > 1e-3
    assert (expected[FIRST] - expected[SECOND]).abs().max() > 1e-3


def test_a_mixed_batch_leaves_the_active_adapter_as_it_was() -> None:
    model = two_adapter_model("llama", "protect", "select")
    input_ids = batch(2)
    with torch.no_grad():
        before = model(input_ids).logits
        model(input_ids, adapter_names=[SECOND, "__base__"])
        after = model(input_ids).logits
    assert model.active_adapter == FIRST
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not any(module._forward_pre_hooks for module in model.modules() if isinstance(module, SSAHLayer))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_a_mixed_batch_matches_each_adapter_alone(num_beams: int) -> None:
    model = two_adapter_model("llama", "select", "protect")
    names = [SECOND, "__base__", FIRST]
    input_ids = batch(len(names))
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=num_beams)
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, adapter_names=names, **options)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=input_ids[row : row + 1], **options)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=input_ids[row : row + 1], **options)
            assert torch.equal(mixed[row], alone[0])


def test_modules_to_save_follow_the_rows_adapter_too() -> None:
    units = tiny_units()
    model = get_peft_model(
        tiny_model("llama"), SSAHConfig(units=units, modules_to_save=["lm_head"], init_weights=False), FIRST
    )
    model.add_adapter(SECOND, SSAHConfig(units=units, mode="select", modules_to_save=["lm_head"], init_weights=False))
    with torch.no_grad():  # different heads per adapter, so a row given the wrong one shows
        for name, param in model.named_parameters():
            if "lm_head.modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.5)
    model.eval()
    names = ["__base__", FIRST, SECOND]
    input_ids = batch(len(names))
    with torch.no_grad():
        mixed = model(input_ids, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = single_adapter_logits(model, input_ids, name)
            torch.testing.assert_close(mixed[row], alone[row], rtol=1e-5, atol=1e-6)


def test_mixed_batches_are_refused_where_peft_refuses_them() -> None:
    model = two_adapter_model("llama", "protect", "select")
    input_ids = batch(2)
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): typo"):
        model(input_ids, adapter_names=[FIRST, "typo"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but"):
        model(input_ids, adapter_names=[FIRST, SECOND, FIRST])
    with pytest.raises(TypeError, match="adapter_names must be a list of adapter names, one per row"):
        model(input_ids, adapter_names=FIRST)
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode."):
        model(input_ids, adapter_names=[FIRST, SECOND])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        model(input_ids, adapter_names=[FIRST, SECOND])


# ------------------------------------------------------------------------------------------------------
# add_weighted_adapter
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "mode"), [("llama", "protect"), ("gpt2", "protect"), ("qwen2", "select")])
def test_a_weighted_adapter_is_the_weighted_sum_of_the_updates(family: str, mode: str) -> None:
    model = two_adapter_model(family, mode, mode)
    weights = [0.7, -1.3]
    model.add_weighted_adapter([FIRST, SECOND], weights, "mix", combination_type="cat" if mode == "protect" else None)
    config = model.peft_config["mix"]
    assert (config.mode, config.units) == (mode, model.peft_config[FIRST].units)
    if mode == "protect":
        assert (config.r, config.scaling) == (4 + 2, 1.0)
    layers = [module for module in model.modules() if isinstance(module, SSAHLayer)]
    assert layers and all("mix" in layer.ssah_update for layer in layers)
    for layer in layers:
        by_hand = weights[0] * layer.get_delta_weight(FIRST) + weights[1] * layer.get_delta_weight(SECOND)
        torch.testing.assert_close(layer.get_delta_weight("mix"), by_hand, rtol=1e-5, atol=1e-7)
        if "mix" in layer.ssah_bias:
            bias = weights[0] * layer.ssah_bias[FIRST] + weights[1] * layer.ssah_bias[SECOND]
            torch.testing.assert_close(layer.ssah_bias["mix"], bias)
    assert_update_confined(model, mode, adapter="mix")
    assert model.active_adapter == FIRST  # added, not activated
    assert not any(param.requires_grad for name, param in model.named_parameters() if name.endswith(".mix"))
    # the new adapter runs as its sum: merged into the weights it gives the logits it gives unmerged
    model.set_adapter("mix")
    input_ids = batch(2)
    with torch.no_grad():
        unmerged = model(input_ids).logits
        model.merge_adapter()
        merged = model(input_ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_a_weighted_adapter_saves_and_loads_like_any_other(tmp_path) -> None:
    model = two_adapter_model("llama", "select", "select")
    model.add_weighted_adapter([FIRST, SECOND], [0.5, 0.5], "mix")
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "mix", adapter_name="mix").eval()
    model.set_adapter("mix")
    input_ids = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mode", "combination_type"), [("protect", "linear"), ("protect", "svd"), ("select", "cat"), ("select", "ties")]
)
def test_combinations_that_are_not_exact_are_refused_naming_what_is_supported(mode: str, combination_type: str) -> None:
    model = two_adapter_model("llama", mode, mode)
    with pytest.raises(ValueError) as refused:
        model.add_weighted_adapter([FIRST, SECOND], [1.0, 1.0], "mix", combination_type=combination_type)
    assert str(refused.value) == (
        f"add_weighted_adapter: combination_type={combination_type!r} is not exact for SSAH's {mode} mode. "
        "Supported: 'cat' for protect adapters (a rank r1 + r2 + ... adapter) and 'linear' for select adapters "
        "(weighted sum of the deltas), each over adapters with the same units."
    )
    assert "mix" not in model.peft_config
    assert not any("mix" in module.ssah_update for module in model.modules() if isinstance(module, SSAHLayer))


def test_adapters_of_other_units_or_modes_are_refused() -> None:
    model = two_adapter_model("llama", "protect", "select")
    with pytest.raises(ValueError, match="'second' and 'first' differ in mode; SSAH sums adapters of one mode over"):
        model.add_weighted_adapter([FIRST, SECOND], [1.0, 1.0], "mix")
    model.add_adapter("other", SSAHConfig(units=tiny_units(seed=7), mode="protect", r=2))
    with pytest.raises(ValueError, match="'other' and 'first' differ in units"):
        model.add_weighted_adapter([FIRST, "other"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        model.add_weighted_adapter([FIRST, "other"], [1.0], "mix")
    with pytest.raises(ValueError, match="an adapter named 'other' exists already"):
        model.add_weighted_adapter([FIRST], [1.0], "other")
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        model.add_weighted_adapter([FIRST, "missing"], [1.0, 1.0], "mix")
    assert "mix" not in model.peft_config


# ------------------------------------------------------------------------------------------------------
# Hotswapping and PeftMixedModel: peft refuses every tuner type but its own, with messages naming them
# ------------------------------------------------------------------------------------------------------


def test_hotswapping_is_refused_naming_what_peft_supports(tmp_path) -> None:
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units=tiny_units())).eval()
    model.save_pretrained(tmp_path)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="^Hotswapping only supports LORA but SSAH was passed.$"):
        hotswap_adapter(model, tmp_path, adapter_name="default")
    with pytest.raises(ValueError, match="^No adapter layers found on the model"):
        prepare_model_for_compiled_hotswap(model)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_peft_mixed_model_is_refused_naming_the_types_it_supports() -> None:
    with pytest.raises(ValueError, match="The provided `peft_type` 'SSAH' is not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_model("llama"), SSAHConfig(units=tiny_units()), mixed=True)
