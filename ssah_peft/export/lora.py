"""``lora``: an SSAH adapter as a plain peft LoRA adapter folder, which vLLM, TGI and llama.cpp can serve.

Both modes convert exactly (the same update, not an approximation):

* **protect**: the update is already LoRA's, ΔW = (B ⊙ keep_out)(A ⊙ keep_in) · alpha/r, so the LoRA factors are
  A and B with the protected slices set to zero (the raw tensors keep their initial values there; the masked ones
  are written), at the same rank r and ``lora_alpha = alpha``. A merge of the LoRA adapter leaves the protected
  slices of every weight exactly unchanged.
* **select**: a row delta D (``k × in``, for rows ``idx``) is exactly B·A with A = D and B the ``out × k`` one-hot
  columns e_idx; a column delta D (``out × k``, for columns ``idx``) is B = D and A the one-hot rows. A trained
  bias (rows of a layer with a bias) goes into ``lora_B.bias`` (``lora_bias=True``).

Every module is written at one rank (the largest; smaller factors are padded with zero rows of A and zero columns
of B, which add exact zeros) and ``lora_alpha`` is chosen so that the scale is the adapter's own (protect: alpha/r;
select: 1). Per-module ranks (peft's ``rank_pattern``) would be smaller files but not portable: vLLM scales every
module by the config's ``lora_alpha / r`` and ignores the patterns, and llama.cpp by ``lora_alpha`` over each
tensor's own rank, so no single ``lora_alpha`` gives every module its scale in both.

The names in ``target_modules`` are the exact module names (protect mode leaves fully protected weights unwrapped,
so a suffix such as ``q_proj`` would adapt weights the adapter never changes); fused weights (``qkv_proj``,
``gate_up_proj``, GPT-2's ``c_attn``) are one module each, and ``fan_in_fan_out`` is set for GPT-2's ``Conv1D``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig

from .._files import safetensors_bytes
from ..tuner import SSAHConfig, SSAHModel
from .base import AdaptedModule, ExportFormat, ExportOptions

Factors = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
"""``(lora_A [rank, in], lora_B [out, rank], lora_B bias [out] or None)`` of one module."""


def lora_ranks(config: SSAHConfig, slice_counts: Mapping[str, int]) -> dict[str, int]:
    """The LoRA rank each adapted module needs: r in protect mode, the number of selected slices in select mode."""
    return {module: config.r if config.mode == "protect" else count for module, count in slice_counts.items()}


def _check(config: SSAHConfig, slice_counts: Mapping[str, int], options: ExportOptions) -> None:
    if config.modules_to_save:
        raise ValueError(
            f"the adapter trains whole modules (modules_to_save: {sorted(config.modules_to_save)}), which a LoRA "
            "adapter cannot carry for serving (vLLM refuses adapters with modules_to_save); export a merged "
            "checkpoint instead (--format merged, ssah_peft.export_merged)"
        )
    ranks = lora_ranks(config, slice_counts)
    too_large = sorted((rank, module) for module, rank in ranks.items() if rank > options.max_rank)
    if too_large:
        rank, module = too_large[-1]
        raise ValueError(
            f"a LoRA export of this {config.mode}-mode adapter needs rank {rank} (at {module}; {len(too_large)} of "
            f"{len(ranks)} modules need more than {options.max_rank}), above the maximum rank {options.max_rank} "
            "(vLLM's --max-lora-rank is at most 256). Export a merged checkpoint instead (--format merged, "
            "ssah_peft.export_merged), or raise the maximum rank (--max-rank) if your server allows it"
        )


def _protect_factors(module: AdaptedModule) -> Factors:
    tensors = module.effective_tensors()
    return tensors["ssah_A"], tensors["ssah_B"], None


def _select_factors(module: AdaptedModule) -> Factors:
    """One-hot factors that place the delta on its rows or columns (module docstring)."""
    tensors = module.effective_tensors()
    delta, index = tensors["ssah_delta"], module.index.to(tensors["ssah_delta"].device)
    layer, k = module.layer, index.numel()
    one_hot = delta.new_zeros(k, layer.out_features if module.axis == "out" else layer.in_features)
    one_hot[torch.arange(k, device=index.device), index] = 1.0
    if module.axis == "in":
        return one_hot, delta, None
    bias = None
    if "ssah_bias" in tensors:
        bias = delta.new_zeros(layer.out_features).index_copy(0, index, tensors["ssah_bias"].to(delta.dtype))
    return delta, one_hot.T, bias


#: The LoRA factors of a module, per :attr:`ssah_peft.SSAHConfig.mode`.
FACTORS = {"protect": _protect_factors, "select": _select_factors}


def _write(tuner: SSAHModel, adapter: str, modules: list[AdaptedModule], folder: Path, options: ExportOptions) -> None:
    config = tuner.peft_config[adapter]
    factors = {module.name: FACTORS[config.mode](module) for module in modules}
    rank = max(A.shape[0] for A, _, _ in factors.values())
    lora_bias = any(bias is not None for _, _, bias in factors.values())
    tensors = {}
    for name, (A, B, bias) in factors.items():
        padding = rank - A.shape[0]
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.cat([A, A.new_zeros(padding, A.shape[1])])
        tensors[f"{key}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], padding)], dim=1)
        if lora_bias:  # peft gives every lora_B a bias then: zeros where nothing was trained
            tensors[f"{key}.lora_B.bias"] = bias if bias is not None else B.new_zeros(B.shape[0])
    alpha = config.alpha if config.mode == "protect" else float(rank)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=int(alpha) if alpha.is_integer() else alpha,
        target_modules=sorted(factors),
        lora_dropout=config.dropout,
        fan_in_fan_out=any(module.layer.fan_in_fan_out for module in modules),
        bias="none",
        use_rslora=False,
        lora_bias=lora_bias,
        task_type=config.task_type,
        base_model_name_or_path=options.base_model or config.base_model_name_or_path,
        inference_mode=True,
    )
    settings = lora_config.to_dict()
    settings["target_modules"] = sorted(factors)  # peft keeps a set; a sorted list gives the same file every time
    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    contiguous = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
    (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes(contiguous, {"format": "pt"}))


LORA = ExportFormat(
    name="lora",
    summary="a peft LoRA adapter folder (exact) for vLLM, TGI and llama.cpp",
    check=_check,
    write=_write,
)
