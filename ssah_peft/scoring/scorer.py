"""The scoring pass: one walk over the calibration batches with hooks on every output projection.

This is the entry point of :mod:`ssah_peft.scoring`. :func:`score_units` scores every unit of a model;
:func:`unit_statistics` runs the same pass but stops at the mergeable statistics, for shards scored by independent
jobs. Both take the same options, declared once in :class:`ScoringOptions`. The pass itself only drives the model
(inputs to the right device, eval mode and back, SNIP's backward) and leaves the arithmetic to
:mod:`.accumulators` and the result types to :mod:`.results`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import input_device
from ..quantization import disable_cpu_4bit_repacking
from ..units import ArchitectureSpec, resolve_architecture
from .accumulators import (
    BatchTokens,
    attach_projections,
    distributed_run,
    host_copies,
    merge_across_ranks,
    snip_backward,
)
from .results import UnitScores, UnitStatistics, group_by_block, model_fingerprint, model_weights_hash

ScoringMethod = Literal["variance", "wanda", "snip"]
SCORING_METHODS: tuple[str, ...] = ("variance", "wanda", "snip")

Batch = Mapping[str, Any]
ForwardFn = Callable[[nn.Module, dict[str, Any]], Any]
PrepareModelInputsFn = Callable[[Batch], tuple[dict[str, Any], torch.Tensor]]


def prepare_model_inputs_fn_language_modeling(batch: Batch) -> tuple[dict[str, Any], torch.Tensor]:
    """Split a batch into the model's keyword inputs and the ``[batch, seq]`` boolean mask of tokens to score.

    The mask is ``score_mask`` (from :func:`build_calibration_batches`) and'ed with ``attention_mask``; without a
    ``score_mask`` every non-padding token is scored.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches must be mappings of model inputs, got {type(batch).__name__}")
    inputs = dict(batch)
    score_mask = inputs.pop("score_mask", None)
    reference = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"][..., 0]
    attention_mask = inputs.get("attention_mask")
    mask = torch.ones_like(reference, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if score_mask is not None:
        mask = mask & score_mask.to(mask.device).bool()
    return inputs, mask


def forward_fn_dict(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """Default forward: ``model(**inputs)``."""
    return model(**inputs)


@dataclass(frozen=True)
class ScoringOptions:
    """How a scoring pass runs: the keyword arguments of :func:`score_units` and :func:`unit_statistics`.

    Attributes:
        method: ``"variance"`` (the paper's Eq. 1), ``"wanda"`` or ``"snip"`` (see :mod:`ssah_peft.scoring`).
        forward_fn: ``forward_fn(model, inputs)`` runs the model; for ``"snip"`` its output must have ``logits``.
        prepare_model_inputs_fn: ``batch -> (model inputs, [batch, seq] bool mask of the tokens to score)``.
            Inputs are moved to the device of the input embeddings. For ``"snip"`` they must hold ``input_ids``.
        architecture: where the units are; resolved from ``model.config`` when not given.
        gather_distributed_inputs: if ``torch.distributed`` is initialized, merge the statistics of all ranks so
            every rank returns the scores of the union of the shards. Set ``False`` when ranks see the same data.
        show_progress_bar: show a tqdm bar over the batches.
        metadata: description of the calibration data, stored in :attr:`UnitScores.metadata`.
    """

    method: ScoringMethod = "variance"
    forward_fn: ForwardFn = forward_fn_dict
    prepare_model_inputs_fn: PrepareModelInputsFn = prepare_model_inputs_fn_language_modeling
    architecture: Optional[ArchitectureSpec] = None
    gather_distributed_inputs: bool = True
    show_progress_bar: bool = True
    metadata: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        if self.method not in SCORING_METHODS:
            raise ValueError(f"method must be one of {SCORING_METHODS}, got {self.method!r}")

    @classmethod
    def of(cls, function: str, options: Mapping[str, Any]) -> ScoringOptions:
        """The options of a call ``function(model, dataloader, **options)``; ``TypeError`` names the function."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"{function}() got unexpected keyword arguments {unknown}; it takes {known}")
        return cls(**options)


def score_units(model: nn.Module, dataloader: Iterable[Batch], **options: Any) -> UnitScores:
    """Score every unit of ``model`` on the calibration batches of ``dataloader`` (one pass).

    Args:
        model: a transformers causal LM (fp32/bf16/fp16, bitsandbytes 4/8-bit, any ``device_map``), not wrapped
            by peft adapters (merge them first). Its train/eval state is restored afterwards.
        dataloader: batches as produced by :func:`build_calibration_batches`, or any iterable of mappings that
            ``prepare_model_inputs_fn`` understands. Under ``torch.distributed`` each rank passes its own shard.
        **options: any field of :class:`ScoringOptions`, by keyword (``method="snip"``, ``metadata={...}``, ...);
            they are declared and documented there, once for this function and :func:`unit_statistics`.

    Raises:
        ValueError: no batches, a batch without any token to score, fewer than two scored tokens, non-finite
            activations or loss, or a model whose output projections are wrapped by adapters.
    """
    # scores do not record the weights' hash (reading every parameter); only shard files are compared by it
    return _statistics_pass(model, dataloader, ScoringOptions.of("score_units", options), hash_weights=False).finalize()


def unit_statistics(model: nn.Module, dataloader: Iterable[Batch], **options: Any) -> UnitStatistics:
    """The pass of :func:`score_units` (same arguments), stopped before the statistics become scores.

    For shards scored by independent jobs without ``torch.distributed``: each job saves its statistics with
    :func:`save_partial_scores`, and :func:`merge_partial_scores` turns the files into the scores of one pass
    over all shards. An empty ``dataloader`` gives empty statistics, which merge as nothing; ``metadata``
    should describe the whole calibration set, as shards that disagree on it are not merged: put the
    :func:`calibration_data_hash` of the whole set in it as ``"data_sha256"``. The statistics record the
    :func:`model_weights_hash` of the model, so shards of other weights are not merged either.

    Raises:
        ValueError: as :func:`score_units`, except that no batches is not an error before :meth:`finalize`.
    """
    return _statistics_pass(model, dataloader, ScoringOptions.of("unit_statistics", options), hash_weights=True)


def _prepared_batches(
    dataloader: Iterable[Batch], prepare_model_inputs_fn: PrepareModelInputsFn, device: torch.device
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Each batch's model inputs on ``device`` and its mask of tokens to score, on the host for a CUDA mask.

    The hooks need the mask's values on the host before the batch's forward (:class:`BatchTokens`). Reading a
    mask back from a GPU waits for everything queued before it, so each batch is prepared one batch ahead: its
    mask is copied back while the forward before it is still queued, and reading it waits only for the forward
    before that one. The GPU never runs dry between batches.
    """
    pending = None
    for batch in dataloader:
        inputs, mask = prepare_model_inputs_fn(batch)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        upcoming = (inputs, *_copy_to_host(mask))
        if pending is not None:
            yield _when_copied(*pending)
        pending = upcoming
    if pending is not None:
        yield _when_copied(*pending)


def _copy_to_host(mask: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """Queue the copy of a CUDA ``mask`` into pinned host memory; the event marks its end."""
    if mask.device.type != "cuda":
        return mask, None
    host = torch.empty(mask.shape, dtype=mask.dtype, pin_memory=True)
    host.copy_(mask, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(mask.device))
    return host, copied


def _when_copied(
    inputs: dict[str, Any], mask: torch.Tensor, copied: Optional[torch.cuda.Event]
) -> tuple[dict[str, Any], torch.Tensor]:
    if copied is not None:
        copied.synchronize()
    return inputs, mask


def _statistics_pass(
    model: nn.Module, dataloader: Iterable[Batch], options: ScoringOptions, hash_weights: bool
) -> UnitStatistics:
    method = options.method
    spec = options.architecture if options.architecture is not None else resolve_architecture(model.config)
    fingerprint = model_fingerprint(model, spec)
    disable_cpu_4bit_repacking(model)  # before any forward: dense_weight must dequantize the standard layout
    projections = attach_projections(model, spec, method)
    weights_sha256 = model_weights_hash(model) if hash_weights else None
    in_training = [module for module in model.modules() if module.training]  # restored afterwards
    if in_training:
        model.eval()
    batch_tokens = BatchTokens(targets_only=method == "snip")
    for projection in projections:
        projection.register(batch_tokens)
    try:
        device = input_device(model)
        progress = tqdm(dataloader, desc=f"Scoring units ({method})", disable=not options.show_progress_bar)
        prepared = _prepared_batches(progress, options.prepare_model_inputs_fn, device)
        for batch_index, (inputs, mask) in enumerate(prepared):
            batch_tokens.set(mask, batch_index)
            if method == "snip":
                snip_backward(model, options.forward_fn, inputs, batch_tokens, batch_index)
            else:
                with torch.no_grad():
                    options.forward_fn(model, inputs)
            for projection in projections:
                projection.accumulator.end_batch(batch_tokens)
    finally:
        for projection in projections:
            projection.remove()
        for module in in_training:
            module.training = True
    if options.gather_distributed_inputs and distributed_run():
        merge_across_ranks([p.accumulator for p in projections])
    # every statistic read back in one copy: one wait for the device
    read_back = host_copies([p.accumulator.state() for p in projections] + [p.weight_statistic for p in projections])
    states, weights = read_back[: len(projections)], read_back[len(projections) :]
    if not torch.isfinite(torch.cat([t for t in read_back if t is not None])).all():  # one check, then who
        for projection, state, weight in zip(projections, states, weights):
            assert state is not None
            projection.check_finite(state, weight)
    return UnitStatistics(
        method=method,
        states=group_by_block((p.kind, p.layer, s) for p, s in zip(projections, states) if s is not None),
        weight_statistics=group_by_block((p.kind, p.layer, w) for p, w in zip(projections, weights) if w is not None),
        fingerprint=fingerprint,
        metadata=dict(options.metadata or {}),
        weights_sha256=weights_sha256,
    )
