"""``merged``: the base model with the adapter merged in, as an ordinary checkpoint folder.

What serves any adapter, whatever its rank or ``modules_to_save``: ``AutoModelForCausalLM.from_pretrained`` loads
it, and with the tokenizer saved beside it so does any server. A bitsandbytes-quantized base is merged into a
dequantized copy (:func:`ssah_peft.merge_and_dequantize`), which is exact, where merging into the 4-bit weights
would requantize them. The export merges the model it is given in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..tuner import SSAHConfig, SSAHModel
from ..tuner.dequantize import is_bnb_layer
from .base import AdaptedModule, ExportFormat, ExportOptions


def _check(config: SSAHConfig, slice_counts: Mapping[str, int], options: ExportOptions) -> None:
    """Every SSAH adapter merges."""


def _write(tuner: SSAHModel, adapter: str, modules: list[AdaptedModule], folder: Path, options: ExportOptions) -> None:
    if any(is_bnb_layer(module) for module in tuner.model.modules()):
        tuner.set_adapter(adapter)  # merge_and_dequantize merges the active adapter
        merged = tuner.merge_and_dequantize()
    else:
        merged = tuner.merge_and_unload(safe_merge=True, adapter_names=[adapter])
    merged.save_pretrained(folder)
    if options.tokenizer is not None:
        options.tokenizer.save_pretrained(folder)


MERGED = ExportFormat(
    name="merged",
    summary="a checkpoint folder with the adapter merged in (AutoModelForCausalLM.from_pretrained), any adapter",
    check=_check,
    write=_write,
)
