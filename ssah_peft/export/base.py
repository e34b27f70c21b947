"""What every export format shares: the format's two steps, its options, and the adapter as it reads it.

An export reads one SSAH adapter of a peft model through :class:`AdaptedModule`: the module's name in the base
model, its layer, and the update's *effective* tensors (protect mode's A and B with the protected slices at zero,
select mode's delta and bias) built from the layer's public attributes, never from the raw trainable tensors,
whose protected slices keep their initial values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .._files import read_safetensors
from ..tuner import SSAHConfig, SSAHLayer, SSAHModel

#: vLLM's largest ``--max-lora-rank``: the default limit of a LoRA export.
DEFAULT_MAX_RANK = 256


@dataclass(frozen=True)
class ExportOptions:
    """The settings of an export; each format reads the ones it needs."""

    max_rank: int = DEFAULT_MAX_RANK
    """LoRA: the largest rank a module may get (a server's ``--max-lora-rank``)."""
    tokenizer: Any = None
    """Merged: a tokenizer saved beside the checkpoint, so that the folder loads as a model on its own."""
    base_model: Optional[str] = None
    """LoRA: the base model recorded as ``base_model_name_or_path`` (default: the one the adapter records)."""


@dataclass(frozen=True)
class ExportFormat:
    """One way to write an SSAH adapter; :data:`ssah_peft.export.EXPORT_FORMATS` lists them by ``name``."""

    name: str
    summary: str
    """One line for ``ssah-peft export --help``."""
    check: Callable[[SSAHConfig, Mapping[str, int], ExportOptions], None]
    """Raise ``ValueError`` for an adapter this format cannot hold, from its config and the number of slice indices
    of each adapted module (select: the selected slices, protect: the protected ones), so that a command can refuse
    it before loading any model."""
    write: Callable[[SSAHModel, str, list[AdaptedModule], Path, ExportOptions], None]
    """Write the adapter into an empty folder; the caller makes the folder appear atomically."""


@dataclass(frozen=True)
class AdaptedModule:
    """One module that an SSAH adapter changes."""

    name: str
    """Name in the base model, e.g. ``model.layers.0.self_attn.q_proj`` (peft's ``target_modules`` form)."""
    layer: SSAHLayer
    adapter: str
    mode: str

    @property
    def axis(self) -> str:
        """``"out"``: the slices are rows of the weight; ``"in"``: columns."""
        return self.layer.ssah_axis[self.adapter]

    @property
    def index(self) -> torch.Tensor:
        """The slice indices (selected in select mode, protected in protect mode), as int64."""
        return self.layer.ssah_index[self.adapter].long()

    def effective_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the update is made of, by their name in the adapter file, detached.

        protect: ``ssah_A`` and ``ssah_B`` with the protected columns of A (axis ``"in"``) or rows of B (axis
        ``"out"``) set to zero, as every forward and merge masks them. select: ``ssah_delta`` and, where trained,
        ``ssah_bias``.
        """
        layer, adapter = self.layer, self.adapter
        if self.mode == "protect":
            A, B = layer.ssah_A[adapter].detach(), layer.ssah_B[adapter].detach()
            index = self.index.to(A.device)
            if self.axis == "out":
                return {"ssah_A": A, "ssah_B": B.index_fill(0, index, 0.0)}
            return {"ssah_A": A.index_fill(1, index, 0.0), "ssah_B": B}
        tensors = {"ssah_delta": layer.ssah_delta[adapter].detach()}
        if adapter in layer.ssah_bias:
            tensors["ssah_bias"] = layer.ssah_bias[adapter].detach()
        return tensors


def resolve_adapter(model: nn.Module, adapter_name: Optional[str]) -> tuple[SSAHModel, str]:
    """The SSAH tuner of a ``PeftModel`` (or the tuner itself) and the adapter to export: ``adapter_name``, or
    the active adapter when there is exactly one."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, SSAHModel):
        raise TypeError(f"expected a PeftModel with an SSAH adapter or an SSAHModel, got {type(model).__name__}")
    if adapter_name is None:
        if len(tuner.active_adapters) != 1:
            raise ValueError(f"several adapters are active ({tuner.active_adapters}); name the one to export")
        adapter_name = tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"the model has no adapter {adapter_name!r}; its adapters: {sorted(tuner.peft_config)}")
    return tuner, adapter_name


def adapted_modules(tuner: SSAHModel, adapter: str) -> list[AdaptedModule]:
    """The modules the adapter changes, in model order (weights protect mode leaves fully protected are not
    wrapped, so they are not among them)."""
    mode = tuner.peft_config[adapter].mode
    return [
        AdaptedModule(name, module, adapter, mode)
        for name, module in tuner.model.named_modules()
        if isinstance(module, SSAHLayer) and adapter in module.ssah_update
    ]


def check_finite(modules: list[AdaptedModule]) -> None:
    """Refuse an adapter with a NaN or infinite value in an effective tensor, naming the tensor (values in protected
    slices do not count: they never reach the model)."""
    for module in modules:
        for key, tensor in module.effective_tensors().items():
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(
                    f"{module.name}.{key} of adapter {module.adapter!r} holds {bad} non-finite value(s) (NaN or "
                    "infinity): the adapter is broken (diverged training?); nothing was written"
                )


def stored_slice_counts(adapter_dir: Union[str, os.PathLike]) -> dict[str, int]:
    """The number of slice indices of each adapted module, read from the header of a saved adapter's
    ``adapter_model.safetensors`` (no tensor is loaded): what :attr:`ExportFormat.check` needs, before any model is."""
    counts = {}
    with read_safetensors(Path(adapter_dir) / "adapter_model.safetensors", "an SSAH adapter's weights") as file:
        for key in file.keys():
            if key.endswith(".ssah_index"):
                module = key.removesuffix(".ssah_index").removeprefix("base_model.model.")
                counts[module] = int(torch.Size(file.get_slice(key).get_shape()).numel())
    return counts
