"""Tiny random models of every supported family, built from configs (no downloads), and the helpers tests share.

Imported by test modules as ``from helpers import ...``; ``conftest.py`` holds only the fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

VOCAB = 97

# GQA everywhere it exists (4 query heads over 2 or 1 kv heads), biases in Qwen2, fused weights in Phi-3,
# Conv1D in GPT-2.
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
    "gemma": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=8),
    "phi3": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "gpt2": dict(n_embd=32, n_inner=48, n_head=4),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_config(family: str, num_layers: int = 2, **overrides):
    kwargs = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, **FAMILY_CONFIGS[family], **overrides}
    kwargs.setdefault("n_layer" if family == "gpt2" else "num_hidden_layers", num_layers)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():  # non-zero biases, so a wrong bias update would show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    return model.eval()


def tiny_units(seed: int = 0, num_layers: int = 2, mlp_width: int = 48, attn_width: int = 32) -> dict:
    """A unit set per layer: a few MLP neurons, one whole attention head (head_dim 8) and some loose channels."""
    generator = torch.Generator().manual_seed(seed)
    units = {}
    for layer in range(num_layers):
        mlp = torch.randperm(mlp_width, generator=generator)[:6]
        loose = torch.randperm(attn_width - 8, generator=generator)[:3] + 8
        attn = torch.cat([torch.arange(8), loose])
        units[layer] = {"mlp": mlp.tolist(), "attn": attn.tolist()}
    return units


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A character-level fast tokenizer with a ChatML chat template, built offline (vocabulary < 128)."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(specials + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_chat_llama(tokenizer, **overrides) -> torch.nn.Module:
    """A tiny random Llama whose vocabulary and special tokens fit ``tokenizer`` (:func:`tiny_tokenizer`)."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tiny_model("llama", vocab_size=len(tokenizer), **ids, **overrides)


def assert_update_confined(model: torch.nn.Module, mode: str, adapter: str = "default") -> None:
    """In every SSAH layer of ``model``, the effective update is exactly zero outside the slices ``mode`` may change.

    protect: zero on the protected slices (the layer's index); select: zero everywhere but the selected ones.
    """
    from ssah_peft import SSAHLayer

    layers = [module for module in model.modules() if isinstance(module, SSAHLayer)]
    assert layers
    for layer in layers:
        delta = layer.get_delta_weight(adapter)
        dim = 0 if layer.ssah_axis[adapter] == "out" else 1
        in_slices = torch.zeros(delta.shape[dim], dtype=torch.bool)
        in_slices[layer.ssah_index[adapter].long()] = True
        frozen = in_slices if mode == "protect" else ~in_slices
        assert not delta.index_select(dim, frozen.nonzero().flatten()).any()


# bitsandbytes 4-bit on CPU. bitsandbytes 0.50 repacks a Linear4bit weight in place into its CPU kernel's layout on
# the first eval-mode no-grad forward, but only where the CPU has AVX-512 BF16 (``support_avx512bf16_for_cpu``, set
# from the CPU when the layer is built). The two helpers below give every CPU both paths, without branching on it.


def repack_4bit_for_cpu(model: torch.nn.Module) -> list[str]:
    """Repack every Linear4bit weight of ``model`` as an eval-mode forward does on a CPU with AVX-512 BF16.

    Calls bitsandbytes' own conversion (plain torch, so it runs on any CPU) exactly as ``Linear4bit.forward`` does:
    the weight data is replaced and the quant state is converted in place (block scales rounded to bfloat16,
    ``packing_format_for_cpu`` set). Returns the names of the repacked layers.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    repacked = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            module.weight.data, _ = _convert_weight_packed_for_cpu(module.weight.data, module.weight.quant_state)
            repacked.append(name)
    return repacked


def model_scores(model: torch.nn.Module, seed: int):
    """Random float64 unit scores of the right shapes for ``model`` (a stand-in for a scoring pass)."""
    from ssah_peft import UnitScores
    from ssah_peft.scoring import model_fingerprint

    fingerprint = model_fingerprint(model)
    generator = torch.Generator().manual_seed(seed)
    scores = {
        kind: tuple(torch.rand(w, generator=generator, dtype=torch.float64) for w in widths)
        for kind, widths in fingerprint["widths"].items()
    }
    return UnitScores(scores=scores, method="variance", num_tokens=1, num_sequences=1, fingerprint=fingerprint)


def pairs(count: int = 20, offset: int = 0) -> list[dict[str, str]]:
    """``count`` small benign prompt/response records (a fine-tuning data set)."""
    return [{"prompt": f"What is {i} plus one?", "response": f"It is {i + 1}."} for i in range(offset, offset + count)]


def write_jsonl(path: Path, records) -> Path:
    """Write ``records`` as a JSON Lines file; returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


class Interrupt(Exception):
    """Raised by :class:`StopAfterSave`: a run cut off as a kill would."""


class StopAfterSave(TrainerCallback):
    """Ends the run right after the checkpoint of ``step`` is written, as a kill would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt
