"""QLoRA-style use on a bitsandbytes base (CPU): train, evaluate, merge lossy or into a dequantized copy."""

from __future__ import annotations

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
    from conftest import tiny_model

    path = tmp_path_factory.mktemp("fp32")
    tiny_model("llama", **SIZES).save_pretrained(path)
    return path


def quantized_peft_model(fp32_dir: Path, quantization: str):
    base = AutoModelForCausalLM.from_pretrained(fp32_dir, quantization_config=QUANTIZATION[quantization], device_map="cpu")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    return get_peft_model(base, SSAHConfig(units=UNITS, mode="protect", r=4))


def down_proj(model, layer: int = 0):
    return model.base_model.model.model.layers[layer].mlp.down_proj


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_train_eval_then_merge(fp32_dir: Path, quantization: str) -> None:
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

    with pytest.warns(UserWarning, match="requantizes"):
        model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids).logits
    assert (merged - unmerged).abs().max() <= 2 * quantization_error
    protected_columns = torch.tensor(UNITS[0]["mlp"])
    layer_error = (weight_before - fp32.model.layers[0].mlp.down_proj.weight).abs().max()
    drift = (down_proj(model).get_base_weight() - weight_before)[:, protected_columns].abs().max()
    assert drift <= 2 * layer_error


def test_merge_into_dequantized_copy_is_exact(fp32_dir: Path) -> None:
    model = quantized_peft_model(fp32_dir, "nf4")
    for name, param in model.named_parameters():
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
