"""Turning a bitsandbytes-quantized base into plain floating-point layers, for an exact merge.

:meth:`ssah_peft.SSAHModel.merge_and_dequantize` merges adapters into dequantized copies of the 4-bit / 8-bit
weights instead of requantizing them (which is lossy and breaks the protected slices' exactness). These helpers
build those copies and settle the merged model's dtype, so that the result runs and saves as an ordinary
checkpoint (the norms and embeddings ``prepare_model_for_kbit_training`` upcast to float32 included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def is_bnb_layer(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantized_linear(base: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` in ``dtype`` with the dequantized weight (and the bias) of a bitsandbytes layer."""
    from peft.utils import resolve_quantization_backend

    weight = resolve_quantization_backend(base).get_base_weight(base)  # a new tensor, in the stored dtype
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if base.bias is not None:
        bias = base.bias.detach().to(device=weight.device, dtype=dtype).clone()
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype shared by the model's bitsandbytes 4-bit layers; float32 if there are none or they differ."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return torch.float32
    dtypes = {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.compute_dtype}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def target_dtypes(model: nn.Module, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """``parameter name → dtype``: ``dtype``, except float32 inside modules transformers keeps in float32 for it."""
    kept = set()
    if dtype in (torch.float16, torch.bfloat16):
        kept.update(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        kept.update(getattr(model, "_keep_in_fp32_modules", None) or ())

    def target(name: str) -> torch.dtype:
        dotted = "." + name.replace(".base_layer.", ".") + "."
        return torch.float32 if any(f".{module}." in dotted for module in kept) else dtype

    return target


def cast_parameter(param: nn.Parameter, dtype: torch.dtype) -> None:
    if param.is_floating_point() and param.dtype != dtype:
        param.data = param.data.to(dtype)  # in place: tied parameters stay tied
