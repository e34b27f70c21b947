"""SSAH tuner layers: channel-gathered deltas (select) and slice-masked low-rank updates (protect)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..units import Axis
from .slice_index import SliceIndexDict


class SSAHLayer(BaseTunerLayer):
    """Per-adapter state of one adapted weight W (``[out, in]`` in the ``nn.Linear`` convention).

    select mode, axis ``"out"``: ``ssah_delta`` is ``[k, in]`` for the rows ``ssah_index`` of W (plus
    ``ssah_bias`` ``[k]`` when the base layer has a bias); the forward adds ``x @ delta.T`` into those output
    channels with ``index_add``. Axis ``"in"``: ``ssah_delta`` is ``[out, k]`` for the columns ``ssah_index``;
    the forward adds ``x[..., index] @ delta.T``. No full-size delta and no copy of W are ever built.

    protect mode: ``ssah_A`` ``[r, in]`` and ``ssah_B`` ``[out, r]`` as in LoRA, with the protected rows of B
    (axis ``"out"``) or columns of A (axis ``"in"``) replaced by zeros inside every forward and merge, so the
    protected slices of the effective weight are never changed, whatever the optimizer does to the raw tensors.
    """

    adapter_layer_names: tuple[str, ...] = ("ssah_delta", "ssah_bias", "ssah_A", "ssah_B")
    other_param_names: tuple[str, ...] = ("ssah_index", "ssah_axis", "ssah_mode", "scaling", "ssah_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ssah_delta = nn.ParameterDict({})
        self.ssah_bias = nn.ParameterDict({})
        self.ssah_A = nn.ParameterDict({})
        self.ssah_B = nn.ParameterDict({})
        self.ssah_index = SliceIndexDict()  # persistent; loading other indices than the config's is refused
        self.ssah_dropout = nn.ModuleDict({})
        self.ssah_axis: dict[str, Axis] = {}
        self.ssah_mode: dict[str, str] = {}
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
        self.ssah_mode[adapter_name] = mode
        self.ssah_axis[adapter_name] = axis
        self.scaling[adapter_name] = scaling
        self.ssah_index[adapter_name] = index.to(torch.int32)
        self.ssah_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if mode == "select":
            k = index.numel()
            shape = (k, self.in_features) if axis == "out" else (self.out_features, k)
            self.ssah_delta[adapter_name] = nn.Parameter(torch.zeros(shape))
            if axis == "out" and getattr(self.get_base_layer(), "bias", None) is not None:
                self.ssah_bias[adapter_name] = nn.Parameter(torch.zeros(k))
        else:
            self.ssah_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
            self.ssah_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r))
            nn.init.kaiming_uniform_(self.ssah_A[adapter_name], a=math.sqrt(5))
        if not init_weights:
            self._randomize(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _randomize(self, adapter_name: str) -> None:
        """Non-identity start, so tests can see merges, masks and save/load act on real values."""
        with torch.no_grad():
            for container in (self.ssah_delta, self.ssah_bias, self.ssah_B):
                if adapter_name in container:
                    container[adapter_name].normal_(std=0.02)

    # ------------------------------------------------------------------------------------------------
    # The effective update
    # ------------------------------------------------------------------------------------------------

    def _index(self, adapter: str, device: torch.device) -> torch.Tensor:
        return self.ssah_index[adapter].to(device=device, dtype=torch.long)

    def _masked_lora(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B with the protected slices set to exactly zero (out of place, so their grads are zero)."""
        A, B = self.ssah_A[adapter], self.ssah_B[adapter]
        index = self._index(adapter, A.device)
        if index.numel():
            if self.ssah_axis[adapter] == "out":
                B = B.index_fill(0, index, 0.0)
            else:
                A = A.index_fill(1, index, 0.0)
        return A, B

    def _adapter_forward(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base layer's output) plus this adapter's update, in the adapter's dtype."""
        mode, axis = self.ssah_mode[adapter], self.ssah_axis[adapter]
        weight = self.ssah_delta[adapter] if mode == "select" else self.ssah_A[adapter]
        x = self._cast_input_dtype(self.ssah_dropout[adapter](x), weight.dtype)
        if mode == "protect":
            A, B = self._masked_lora(adapter)
            return result + (F.linear(F.linear(x, A), B) * self.scaling[adapter]).to(result.dtype)
        index = self._index(adapter, x.device)
        if axis == "in":
            return result + F.linear(x.index_select(-1, index), weight).to(result.dtype)
        update = F.linear(x, weight, self.ssah_bias[adapter] if adapter in self.ssah_bias else None)
        return result.index_add(-1, index, update.to(result.dtype))

    # ------------------------------------------------------------------------------------------------
    # Merging
    # ------------------------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``[out, in]`` update of one adapter (for inspection and merging into other formats).

        Builds a full-size tensor; the forward never does.
        """
        delta = torch.zeros(self.out_features, self.in_features, device=self._device(adapter))
        self._add_to_weight(adapter, delta, sign=1.0, transposed=False)
        return delta

    def _device(self, adapter: str) -> torch.device:
        container = self.ssah_delta if self.ssah_mode[adapter] == "select" else self.ssah_A
        return container[adapter].device

    def _add_to_weight(self, adapter: str, weight: torch.Tensor, sign: float, transposed: bool) -> None:
        """Add ``sign`` × the update to ``weight`` in place; ``transposed`` for ``[in, out]`` storage (Conv1D)."""
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        with torch.no_grad():
            if self.ssah_mode[adapter] == "protect":
                A, B = self._masked_lora(adapter)
                delta = (B @ A) * (self.scaling[adapter] * sign)
                weight.add_((delta.T if transposed else delta).to(weight.dtype))
                return
            delta = self.ssah_delta[adapter].to(weight.dtype) * sign
            index = self._index(adapter, weight.device)
            if self.ssah_axis[adapter] == "out":
                weight.index_add_(out_dim, index, delta.T if transposed else delta)
            else:
                weight.index_add_(in_dim, index, delta.T if transposed else delta)

    def _add_to_bias(self, adapter: str, bias: torch.Tensor, sign: float) -> None:
        """Add ``sign`` × the select-mode bias delta to ``bias`` in place."""
        with torch.no_grad():
            index = self._index(adapter, bias.device)
            bias.index_add_(0, index, (self.ssah_bias[adapter] * sign).to(bias.dtype))

    def _apply_to_base(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        """Add ``sign`` × the update to the base weight and bias. With ``safe_merge`` both are built as copies and
        checked before either is written, so a broken adapter leaves the base layer untouched."""
        weight = self.get_base_weight()  # a dequantized copy for quantized layers, the weight data otherwise
        bias = self.get_base_layer().bias.data if adapter in self.ssah_bias else None
        if safe_merge:
            weight = weight.clone()
            bias = bias.clone() if bias is not None else None
        self._add_to_weight(adapter, weight, sign, transposed=self.fan_in_fan_out)
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
            if adapter not in self.ssah_mode:
                continue
            if self.quantization_backend is not None:
                if not self.quantization_backend.supports_merge:
                    raise TypeError(f"Cannot merge into a {self.quantization_backend.backend_name} layer")
                _warn_lossy_merge(self.quantization_backend.backend_name)
            self._apply_to_base(adapter, 1.0, safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.ssah_mode:
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
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter in self.active_adapters:
            if adapter in self.ssah_mode:
                result = self._adapter_forward(adapter, x, result)
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
