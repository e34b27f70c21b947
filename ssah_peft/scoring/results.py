"""What a scoring pass produces, and what identifies the model it was computed on.

Scores are indices into one particular model: unit 17 of layer 3 means nothing on a model of other widths or
other weights. So the result types carry that identity with them: :class:`UnitScores` (one score per unit, the
input of :class:`ssah_peft.UnitMap`) and :class:`UnitStatistics` (the mergeable running statistics a pass ends
with, before they become scores), with :func:`model_fingerprint` (shapes and a weight sample, from
:mod:`ssah_peft.fingerprint`; re-exported here) and :func:`model_weights_hash` (all values) saying which model they
belong to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..fingerprint import model_fingerprint  # noqa: F401 - re-exported: ssah_peft.scoring.model_fingerprint
from ..units import PerBlock
from .accumulators import merged_accumulator, unit_score


def model_weights_hash(model: nn.Module) -> str:
    """sha256 (hex) of every parameter of ``model``: name, dtype, shape and the bytes of its values, in order.

    Quantized weights are hashed as stored (packed); parameters on the meta device (offloaded) by name, dtype and
    shape only. Reads each parameter once, moving it to the CPU one at a time.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        tensor = parameter.detach().as_subclass(torch.Tensor)
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        if tensor.is_meta:
            digest.update(b"meta|")
            continue
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
    return digest.hexdigest()


@dataclass(frozen=True)
class UnitScores:
    """One importance score per unit of a model, from one calibration data set.

    ``scores[kind][layer]`` is a float64 CPU tensor with one entry per unit of that block (higher = more
    important). ``fingerprint`` (see :func:`model_fingerprint`) identifies the model the indices refer to.
    """

    scores: dict[str, tuple[torch.Tensor, ...]]
    method: str
    num_tokens: int
    """Scored tokens (all methods) over all ranks."""
    num_sequences: int
    """Sequences with at least one scored token (SNIP: at least one scored target) over all ranks."""
    fingerprint: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form description of the calibration data (name, size, token selection), kept with unit maps."""

    @property
    def num_layers(self) -> int:
        return int(self.fingerprint["num_layers"])

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.scores)

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        layer, kind = key
        return self.scores[kind][layer]

    def calibration_info(self) -> dict[str, Any]:
        """Method, counts and metadata, as recorded in a unit map file."""
        return {
            "method": self.method,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            **self.metadata,
        }


@dataclass(frozen=True)
class UnitStatistics:
    """The running statistics of a scoring pass over (a shard of) one calibration set, before they become scores.

    Scores of shards do not combine, these do: the float64 moments (count, mean, M2) merge exactly with Chan et
    al.'s formula and SNIP's saliency sums add up, so shards scored apart give the scores of one pass over all
    of them. Come from :func:`unit_statistics`; :meth:`finalize` turns them into :class:`UnitScores`.
    """

    method: str
    states: PerBlock
    """``states[kind][layer]``: the block's float64 state vector: scored tokens, sequences, then per unit the
    mean and M2 of its input (variance, wanda) or its saliency sum (snip)."""
    weight_statistics: PerBlock
    """``weight_statistics[kind][layer]``: the weight factor of the scores, ‖W_{:,j}‖² (variance) or Σ_i |W_ij|
    (wanda), kept so that scores can be finished without the model; empty for snip, whose sums hold the weights."""
    fingerprint: dict[str, Any]
    """The model the statistics come from (:func:`model_fingerprint`)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Description of the whole calibration set, becomes :attr:`UnitScores.metadata`; the same in every shard.
    ``metadata["data_sha256"]`` (:func:`calibration_data_hash` of the whole set) makes merges check the data."""
    weights_sha256: Optional[str] = None
    """sha256 of all the model's parameters (names, dtypes, shapes, values) when the pass ran; shards of one set
    must share it, whatever the method (:func:`model_weights_hash`)."""

    def finalize(self) -> UnitScores:
        """The scores. ``ValueError`` when no token was scored (no shard had a batch) or the variance has fewer
        than two tokens."""
        accumulators = {
            kind: [merged_accumulator(self.method, [s]) for s in states] for kind, states in self.states.items()
        }
        first = next(iter(accumulators.values()))[0]
        if first.num_tokens == 0:
            raise ValueError("The calibration dataloader yielded no batches: nothing to score")
        scores = {}
        for kind, layers in accumulators.items():
            weights = self.weight_statistics.get(kind, (None,) * len(layers))  # none for snip
            scores[kind] = tuple(unit_score(self.method, a, w) for a, w in zip(layers, weights))
        return UnitScores(
            scores=scores,
            method=self.method,
            num_tokens=first.num_tokens,
            num_sequences=first.num_sequences,
            fingerprint=dict(self.fingerprint),
            metadata=dict(self.metadata),
        )


def group_by_block(entries: Iterable[tuple[str, int, torch.Tensor]]) -> PerBlock:
    """``{kind: (layer 0, layer 1, ...)}`` from ``(kind, layer, tensor)`` entries in any order; kinds sorted, so
    statistics from a pass and from a file list them alike."""
    by_kind: dict[str, dict[int, torch.Tensor]] = {}
    for kind, layer, tensor in entries:
        by_kind.setdefault(kind, {})[layer] = tensor
    return {kind: tuple(by_kind[kind][i] for i in sorted(by_kind[kind])) for kind in sorted(by_kind)}
