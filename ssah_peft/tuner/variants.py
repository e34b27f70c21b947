"""The two kinds of SSAH update, as small objects chosen once per adapter (peft's ``LoraVariant`` pattern).

:class:`SSAHLayer` keeps peft's per-adapter dicts and the bookkeeping every tuner layer shares (merge state,
safe merge, quantized base weights); what differs between the modes — which tensors an adapter owns, how its
update enters the forward, and how it is written into a weight — lives here. The layer picks the update object
of an adapter when the adapter is created and never tests the mode again.

* :class:`SelectUpdate` ("train only these units"): a dense delta for the selected rows (axis ``"out"``, plus
  their bias entries) or columns (axis ``"in"``) of the weight; the forward adds ``x @ delta.T`` into those
  output channels, or reads only those input channels. No full-size delta and no copy of the weight are built.
* :class:`ProtectUpdate` ("train everything but these units"): a LoRA update ``B @ A * scaling`` whose protected
  rows of B (axis ``"out"``) or columns of A (axis ``"in"``) are replaced by zeros inside every forward and merge,
  so the protected slices of the effective weight never change, whatever the optimizer does to the raw tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .layer import SSAHLayer


class SSAHUpdate:
    """How one adapter's update is created, applied in the forward, and added to a weight."""

    mode: ClassVar[str]
    """The :attr:`ssah_peft.SSAHConfig.mode` this update implements."""

    def create(self, layer: SSAHLayer, adapter: str, r: int) -> None:
        """Create the adapter's trainable tensors in the layer's parameter dicts, at the identity."""
        raise NotImplementedError

    def trainable(self, layer: SSAHLayer, adapter: str) -> tuple[nn.Parameter, ...]:
        """The adapter's trainable tensors (the first one tells the adapter's device and dtype)."""
        raise NotImplementedError

    def forward(self, layer: SSAHLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base layer's output) plus the update of ``x`` (already cast to the adapter's dtype)."""
        raise NotImplementedError

    def add_to_weight(
        self, layer: SSAHLayer, adapter: str, weight: torch.Tensor, sign: float, transposed: bool
    ) -> None:
        """Add ``sign`` × the update to ``weight`` in place; ``transposed`` for ``[in, out]`` storage (Conv1D)."""
        raise NotImplementedError

    combination: ClassVar[str]
    """peft's ``add_weighted_adapter`` combination that sums adapters of this mode exactly (:meth:`combine`)."""

    def combine(self, layer: SSAHLayer, adapter: str, sources: list[str], weights: list[float]) -> None:
        """Set the (new, same-slice) ``adapter``'s tensors so that its update is Σ weight × the update of each of
        ``sources``."""
        raise NotImplementedError

    def randomize(self, layer: SSAHLayer, adapter: str) -> None:
        """A non-identity start, so tests can see merges, masks and save/load act on real values."""
        with torch.no_grad():
            for tensor in self.trainable(layer, adapter):
                tensor.normal_(std=0.02)


class SelectUpdate(SSAHUpdate):
    mode = "select"
    combination = "linear"

    def create(self, layer: SSAHLayer, adapter: str, r: int) -> None:
        k = layer.ssah_index[adapter].numel()
        out_axis = layer.ssah_axis[adapter] == "out"
        layer.ssah_delta[adapter] = nn.Parameter(
            torch.zeros((k, layer.in_features) if out_axis else (layer.out_features, k))
        )
        if out_axis and getattr(layer.get_base_layer(), "bias", None) is not None:
            layer.ssah_bias[adapter] = nn.Parameter(torch.zeros(k))

    def trainable(self, layer: SSAHLayer, adapter: str) -> tuple[nn.Parameter, ...]:
        bias = (layer.ssah_bias[adapter],) if adapter in layer.ssah_bias else ()
        return (layer.ssah_delta[adapter], *bias)

    def forward(self, layer: SSAHLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        index = layer.slice_index(adapter, x.device)
        delta = layer.ssah_delta[adapter]
        if layer.ssah_axis[adapter] == "in":
            return result + F.linear(x.index_select(-1, index), delta).to(result.dtype)
        update = F.linear(x, delta, layer.ssah_bias[adapter] if adapter in layer.ssah_bias else None)
        return result.index_add(-1, index, update.to(result.dtype))

    def add_to_weight(
        self, layer: SSAHLayer, adapter: str, weight: torch.Tensor, sign: float, transposed: bool
    ) -> None:
        delta = layer.ssah_delta[adapter].to(weight.dtype) * sign
        dim = 0 if layer.ssah_axis[adapter] == "out" else 1
        if transposed:
            delta, dim = delta.T, 1 - dim
        with torch.no_grad():
            weight.index_add_(dim, layer.slice_index(adapter, weight.device), delta)

    def combine(self, layer: SSAHLayer, adapter: str, sources: list[str], weights: list[float]) -> None:
        # the slices are the same, so the weighted sum of the deltas is the delta of the weighted sum
        with torch.no_grad():
            for tensors in (layer.ssah_delta, layer.ssah_bias):
                if adapter in tensors:
                    total = sum(tensors[source].float() * weight for source, weight in zip(sources, weights))
                    tensors[adapter].copy_(total)


class ProtectUpdate(SSAHUpdate):
    mode = "protect"
    combination = "cat"

    def create(self, layer: SSAHLayer, adapter: str, r: int) -> None:
        layer.ssah_A[adapter] = nn.Parameter(torch.empty(r, layer.in_features))
        layer.ssah_B[adapter] = nn.Parameter(torch.zeros(layer.out_features, r))
        nn.init.kaiming_uniform_(layer.ssah_A[adapter], a=math.sqrt(5))
        index = layer.ssah_slices[adapter]
        if index.numel():  # the trainable slices, shaped to broadcast over B's rows or A's columns
            out_axis = layer.ssah_axis[adapter] == "out"
            keep = torch.ones(layer.out_features if out_axis else layer.in_features, dtype=torch.bool)
            keep[index] = False
            layer.ssah_keep[adapter] = keep[:, None] if out_axis else keep[None, :]

    def randomize(self, layer: SSAHLayer, adapter: str) -> None:
        with torch.no_grad():  # A is random already; B starts at zero
            layer.ssah_B[adapter].normal_(std=0.02)

    def trainable(self, layer: SSAHLayer, adapter: str) -> tuple[nn.Parameter, ...]:
        return layer.ssah_A[adapter], layer.ssah_B[adapter]

    def masked(self, layer: SSAHLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B with the protected slices set to exactly zero: one ``where`` against the precomputed mask, out
        of place so their gradients are zero too, and exact whatever values (inf and nan included) they hold."""
        A, B = layer.ssah_A[adapter], layer.ssah_B[adapter]
        if adapter not in layer.ssah_keep:
            return A, B
        keep = layer.ssah_keep[adapter]
        if layer.ssah_axis[adapter] == "out":
            return A, torch.where(keep, B, 0.0)
        return torch.where(keep, A, 0.0), B

    def forward(self, layer: SSAHLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # scaled at rank r, not at the output width as LoRA does: the same product, a kernel over [tokens, r]
        # instead of [tokens, out_features], which pays for the mask's ``where`` on A or B
        A, B = self.masked(layer, adapter)
        return result + F.linear(F.linear(x, A) * layer.scaling[adapter], B).to(result.dtype)

    def add_to_weight(
        self, layer: SSAHLayer, adapter: str, weight: torch.Tensor, sign: float, transposed: bool
    ) -> None:
        with torch.no_grad():
            A, B = self.masked(layer, adapter)
            delta = (B @ A) * (layer.scaling[adapter] * sign)
            weight.add_((delta.T if transposed else delta).to(weight.dtype))

    def combine(self, layer: SSAHLayer, adapter: str, sources: list[str], weights: list[float]) -> None:
        # LoRA's "cat": [B1 B2] @ [w1 s1 A1; w2 s2 A2] = Σ w_i s_i B_i A_i, at scale alpha / r = 1. The sources share
        # the protected slices, which stay zero in the stacked factors as in each source.
        with torch.no_grad():
            stacked = [self.masked(layer, source) for source in sources]
            A = torch.cat([a.float() * (w * layer.scaling[s]) for (a, _), s, w in zip(stacked, sources, weights)])
            layer.ssah_A[adapter].copy_(A)
            layer.ssah_B[adapter].copy_(torch.cat([b.float() for _, b in stacked], dim=1))


#: The update object of each :attr:`ssah_peft.SSAHConfig.mode` (stateless: one instance serves every layer).
UPDATES: dict[str, SSAHUpdate] = {update.mode: update for update in (SelectUpdate(), ProtectUpdate())}
