"""Reading weights of plain and bitsandbytes-quantized layers, and keeping 4-bit weights readable on CPU.

Both the tuner (merging) and the scorers (column norms of output projections) need a layer's weight as a plain
float matrix in the ``torch.nn.Linear`` convention, whatever stores it: ``nn.Linear``, transformers' transposed
``Conv1D``, or a quantized layer whose ``.weight`` holds packed integers.
"""

from __future__ import annotations

import warnings

import torch
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D


def disable_cpu_4bit_repacking(model: nn.Module) -> None:
    """Keep bitsandbytes Linear4bit weights in their standard layout on CPU.

    bitsandbytes repacks a 4-bit weight in place into a CPU kernel layout on the first eval-mode no-grad forward;
    afterwards dequantization returns wrong values (merges and weight-based scores corrupt silently) and input
    gradients are lost. Switch the repacking off, and undo a repack that already happened. The undo is close but
    not exact: the repack rounds the block scales (absmax) to bfloat16, so a warning says so.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return
    undone = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            if state.absmax.dim() == 2:
                # bitsandbytes 0.50 restores the layout of double-quantized scales only; plain scales stay
                # transposed ([blocks per row, rows]) in bfloat16, which dequantizes to wrong values
                state.absmax = state.absmax.T.reshape(-1).float()
            weight.quant_state = module.quant_state = state
            undone.append(name)
    if undone:
        warnings.warn(
            f"{len(undone)} bitsandbytes 4-bit weights (e.g. {undone[0]}) had already been repacked for the CPU kernel "
            "by an eval-mode forward; they were converted back, with block scales rounded to bfloat16 (relative "
            "error up to ~0.4%). Call ssah_peft.disable_cpu_4bit_repacking(model) right after loading to avoid this.",
            UserWarning,
            stacklevel=2,
        )


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like layer as a float ``[out_features, in_features]`` tensor, for reading.

    Quantized layers are dequantized through peft's quantization backend (a new tensor); for ``nn.Linear`` and
    ``Conv1D`` the result shares the parameter's storage, so it must not be modified: a caller that means to
    write the weight uses :func:`writable_weight`.
    Call :func:`disable_cpu_4bit_repacking` on the model before its first forward when it holds 4-bit layers.
    """
    backend = resolve_quantization_backend(module)
    if backend is not None:
        return backend.get_base_weight(module)
    return writable_weight(module)


def writable_weight(module: nn.Module) -> torch.Tensor:
    """The stored weight of an ``nn.Linear`` or ``Conv1D`` as an ``[out_features, in_features]`` view that writes
    through to the parameter (in place, outside autograd). Quantized weights have no such view."""
    if resolve_quantization_backend(module) is not None:
        raise TypeError(f"{type(module).__name__} stores a quantized weight; it has no writable float view")
    if isinstance(module, Conv1D):
        return module.weight.detach().T
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise TypeError(f"Cannot read a dense weight from a {type(module).__name__}; expected a linear layer")
