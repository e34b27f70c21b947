"""Reading weights of plain and bitsandbytes-quantized layers, and keeping 4-bit weights readable on CPU.

Both the tuner (merging) and the scorers (column norms of output projections) need a layer's weight as a plain
float matrix in the ``torch.nn.Linear`` convention, whatever stores it: ``nn.Linear``, transformers' transposed
``Conv1D``, or a quantized layer whose ``.weight`` holds packed integers.
"""

from __future__ import annotations

import torch
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D


def disable_cpu_4bit_repacking(model: nn.Module) -> None:
    """Keep bitsandbytes Linear4bit weights in their standard layout on CPU.

    bitsandbytes repacks a 4-bit weight in place into a CPU kernel layout on the first eval-mode no-grad forward;
    afterwards dequantization returns wrong values (merges and weight-based scores corrupt silently) and input
    gradients are lost. Undo a repack that already happened and switch it off.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like layer as a float ``[out_features, in_features]`` tensor.

    Quantized layers are dequantized through peft's quantization backend (a new tensor); for ``nn.Linear`` the
    parameter data itself is returned and for ``Conv1D`` its transposed view, so callers must not modify it.
    Call :func:`disable_cpu_4bit_repacking` on the model before its first forward when it holds 4-bit layers.
    """
    backend = resolve_quantization_backend(module)
    if backend is not None:
        return backend.get_base_weight(module)
    if isinstance(module, Conv1D):
        return module.weight.detach().T
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise TypeError(f"Cannot read a dense weight from a {type(module).__name__}; expected a linear layer")
