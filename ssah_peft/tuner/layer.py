"""SSAH tuner layers: peft's per-adapter state around a linear layer; the update itself is a variant object."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..units import Axis
from .slice_index import SliceIndexDict
from .variants import UPDATES, SSAHUpdate


class SSAHLayer(BaseTunerLayer):
    """Per-adapter state of one adapted weight W (``[out, in]`` in the ``nn.Linear`` convention).

    Each adapter has an update object (:mod:`ssah_peft.tuner.variants`), chosen from its mode when it is created:
    select mode owns ``ssah_delta`` (``[k, in]`` for the rows ``ssah_index`` of W, axis ``"out"``, plus
    ``ssah_bias`` ``[k]`` when the base layer has a bias; ``[out, k]`` for the columns, axis ``"in"``), protect
    mode owns LoRA's ``ssah_A`` ``[r, in]`` and ``ssah_B`` ``[out, r]`` with the protected slices ``ssah_index``
    masked to zero in every forward and merge. This class holds what the modes share: peft's per-adapter dicts,
    the slice indices, merging (safe, lossy into quantized weights, and back).
    """

    adapter_layer_names: tuple[str, ...] = ("ssah_delta", "ssah_bias", "ssah_A", "ssah_B")
    other_param_names: tuple[str, ...] = (
        "ssah_index",
        "ssah_slices",
        "ssah_keep",
        "ssah_axis",
        "ssah_update",
        "scaling",
        "ssah_dropout",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ssah_delta = nn.ParameterDict({})
        self.ssah_bias = nn.ParameterDict({})
        self.ssah_A = nn.ParameterDict({})
        self.ssah_B = nn.ParameterDict({})
        self.ssah_index = SliceIndexDict()  # persistent; loading other indices than the config's is refused
        # Derived once per adapter from ssah_index, in the form the forward uses (not saved): int64 indices, and in
        # protect mode the mask of trainable slices. Building them in every forward cost kernels and allocations,
        # twice per step under gradient checkpointing.
        self.ssah_slices = BufferDict({}, persistent=False)
        self.ssah_keep = BufferDict({}, persistent=False)
        self.ssah_dropout = nn.ModuleDict({})
        self.ssah_axis: dict[str, Axis] = {}
        self.ssah_update: dict[str, SSAHUpdate] = {}
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.quantization_backend = resolve_quantization_backend(
            base, get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.in_features, self.out_features = _get_in_out_features(base)
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        mode: str,
        axis: Axis,
        index: torch.Tensor,
        r: int,
        scaling: float,
        dropout: float,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Create the tensors of one adapter. ``index``: selected (select) or protected (protect) slices."""
        length = self.out_features if axis == "out" else self.in_features
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= length):
            raise ValueError(f"slice index out of range [0, {length}) for axis {axis!r} of {self.get_base_layer()}")
        update = UPDATES[mode]
        self.ssah_update[adapter_name] = update
        self.ssah_axis[adapter_name] = axis
        self.scaling[adapter_name] = scaling
        self.ssah_index[adapter_name] = index.to(torch.int32)
        self.ssah_slices[adapter_name] = index
        self.ssah_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        update.create(self, adapter_name, r)
        if not init_weights:
            update.randomize(self, adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def slice_index(self, adapter: str, device: torch.device) -> torch.Tensor:
        """The adapter's slice indices as int64 on ``device`` (``ssah_index`` holds them as saved: int32)."""
        index = self.ssah_slices[adapter]
        return index if index.device == device else index.to(device)

    def _adapter_forward(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base layer's output) plus this adapter's update, computed in the adapter's dtype."""
        update = self.ssah_update[adapter]
        x = self._cast_input_dtype(self.ssah_dropout[adapter](x), update.trainable(self, adapter)[0].dtype)
        return update.forward(self, adapter, x, result)

    # ------------------------------------------------------------------------------------------------
    # Merging
    # ------------------------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``[out, in]`` update of one adapter (for inspection and merging into other formats).

        Builds a full-size tensor; the forward never does.
        """
        update = self.ssah_update[adapter]
        delta = torch.zeros(self.out_features, self.in_features, device=update.trainable(self, adapter)[0].device)
        update.add_to_weight(self, adapter, delta, sign=1.0, transposed=False)
        return delta

    def _add_to_bias(self, adapter: str, bias: torch.Tensor, sign: float) -> None:
        """Add ``sign`` × the select-mode bias delta to ``bias`` in place."""
        with torch.no_grad():
            bias.index_add_(0, self.slice_index(adapter, bias.device), (self.ssah_bias[adapter] * sign).to(bias.dtype))

    def _apply_to_base(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        """Add ``sign`` × the update to the base weight and bias. With ``safe_merge`` both are built as copies and
        checked before either is written, so a broken adapter leaves the base layer untouched."""
        weight = self.get_base_weight()  # a dequantized copy for quantized layers, the weight data otherwise
        bias = self.get_base_layer().bias.data if adapter in self.ssah_bias else None
        if safe_merge:
            weight = weight.clone()
            bias = bias.clone() if bias is not None else None
        self.ssah_update[adapter].add_to_weight(self, adapter, weight, sign, transposed=self.fan_in_fan_out)
        if bias is not None:
            self._add_to_bias(adapter, bias, sign)
        if safe_merge and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
            # peft's wording, so that tools matching peft's message recognise it
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        self.set_base_weight(weight)
        if bias is not None and safe_merge:
            self.get_base_layer().bias.data.copy_(bias)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active (or given) adapters into the base weight.

        Merging into a bitsandbytes weight requantizes whole blocks: it is lossy by design, so it warns; merge
        into a dequantized copy instead with :func:`ssah_peft.merge_and_dequantize` when exactness matters.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.ssah_update:
                continue
            if self.quantization_backend is not None:
                if not self.quantization_backend.supports_merge:
                    raise TypeError(f"Cannot merge into a {self.quantization_backend.backend_name} layer")
                _warn_lossy_merge(self.quantization_backend.backend_name)
            self._apply_to_base(adapter, 1.0, safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.ssah_update:
                self._apply_to_base(adapter, -1.0)


class SSAHLinear(nn.Module, SSAHLayer):
    """SSAH adapter around ``nn.Linear``, ``transformers.Conv1D`` or a bitsandbytes Linear4bit / Linear8bitLt.

    One class serves all of them: the update acts on the layer's input and output (identical for the four),
    and the weight access for merging goes through peft's quantization backend (dequantize / requantize) or,
    for Conv1D, through the transposed storage.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        SSAHLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter in self.active_adapters:
            if adapter in self.ssah_update:
                result = self._adapter_forward(adapter, x, result)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str], **kwargs: Any
    ) -> torch.Tensor:
        """The base output with, for each row of the batch, the update of the adapter named for it (peft's
        ``adapter_names``; ``"__base__"`` rows get the base output).

        Each adapter's update is computed on its own rows only, by the same code as the single-adapter forward, so
        a row's output is the one it has when that adapter alone is active. Adapters this layer does not hold leave
        their rows at the base output, as in the single-adapter forward.
        """
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:  # peft's rule and wording: rows would get the merged adapters on top of their own
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        rows_of: dict[str, list[int]] = {}
        for row, adapter in enumerate(adapter_names):
            rows_of.setdefault(adapter, []).append(row)
        for adapter, rows in rows_of.items():
            if adapter in self.ssah_update:  # "__base__" and adapters of other layers are not
                index = torch.tensor(rows, device=x.device)
                result = result.index_copy(0, index, self._adapter_forward(adapter, x[index], result[index]))
        return result

    def __repr__(self) -> str:
        return "ssah." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)


def _warn_lossy_merge(backend_name: str) -> None:
    warnings.warn(
        f"Merging an SSAH adapter into a {backend_name} weight requantizes whole blocks: the merged model differs "
        "from the adapted one by the quantization error, and the protected slices are no longer bit-exact. "
        "For an exact merge use ssah_peft.merge_and_dequantize(model), which merges into a dequantized copy.",
        UserWarning,
        stacklevel=3,
    )


def supported_base_layer(module: nn.Module) -> bool:
    """Whether :class:`SSAHLinear` can wrap ``module``."""
    if isinstance(module, (nn.Linear, Conv1D)):  # bitsandbytes' layers subclass nn.Linear
        return True
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"
