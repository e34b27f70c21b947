"""transformers' own adapter API (``PreTrainedModel.add_adapter`` and friends) with an SSAH config, on the versions
that ``pip install .`` resolves: every call a user makes on a plain transformers model, without ``PeftModel``."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from helpers import tiny_model, tiny_units
from packaging.version import Version
from safetensors.torch import load_file
from transformers.integrations import peft as transformers_peft

from ssah_peft import SSAHConfig


def test_resolved_transformers_accepts_the_resolved_peft() -> None:
    """transformers 5.24+ demands peft 0.22 for this API; pyproject keeps the two in a working pair."""
    assert Version(peft.__version__) >= Version(transformers_peft.MIN_PEFT_VERSION)


def _config(mode: str) -> SSAHConfig:
    return SSAHConfig(units=tiny_units(), mode=mode, r=2, init_weights=False)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("mode", ["protect", "select"])
def test_add_set_disable_enable_delete(mode: str, input_ids: torch.Tensor) -> None:
    base_logits = _logits(tiny_model("llama"), input_ids)
    model = tiny_model("llama")
    model.add_adapter(_config(mode), adapter_name="first")
    if mode == "select":  # a select adapter starts at zero update: give it one
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "ssah_delta" in name and "first" in name:
                    parameter.normal_(std=0.1)
    first = _logits(model, input_ids)
    assert not torch.allclose(first, base_logits)
    assert model.active_adapters() == ["first"]

    model.add_adapter(_config(mode), adapter_name="second")
    model.set_adapter("second")
    assert model.active_adapters() == ["second"]
    second = _logits(model, input_ids)
    model.set_adapter("first")
    torch.testing.assert_close(_logits(model, input_ids), first, rtol=0, atol=0)

    model.disable_adapters()
    torch.testing.assert_close(_logits(model, input_ids), base_logits, rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(_logits(model, input_ids), first, rtol=0, atol=0)

    model.delete_adapter("second")
    assert "second" not in model.peft_config
    assert not any("second" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, input_ids), first, rtol=0, atol=0)
    assert mode != "protect" or not torch.allclose(second, base_logits)


@pytest.mark.parametrize("mode", ["protect", "select"])
def test_get_adapter_state_dict_and_save_then_load(mode: str, tmp_path: Path, input_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    model.add_adapter(_config(mode), adapter_name="default")
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    adapted = _logits(model, input_ids)

    state = model.get_adapter_state_dict()
    expected_kind = "ssah_A" if mode == "protect" else "ssah_delta"
    assert state and any(expected_kind in key for key in state)
    assert not any("base_layer" in key for key in state)

    model.save_pretrained(tmp_path)
    saved = {key.removeprefix("base_model.model.") for key in load_file(tmp_path / "adapter_model.safetensors")}
    assert saved >= {key for key in state if expected_kind in key}
    assert (tmp_path / "adapter_config.json").is_file()

    fresh = tiny_model("llama")
    fresh.load_adapter(str(tmp_path), adapter_name="default")
    torch.testing.assert_close(_logits(fresh, input_ids), adapted, rtol=0, atol=1e-6)
