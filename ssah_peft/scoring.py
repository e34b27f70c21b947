"""Unit importance from a calibration pass: the paper's activation variance and the Wanda / SNIP baselines.

A unit is input channel j of a block's output projection B (see :mod:`ssah_peft.units`). Li & Kim (arXiv
2410.10862, Eq. 1) score it by how much its input fluctuates over calibration tokens, weighted by the size of the
column of B it feeds::

    I_j = Var_n(X^B_{n,j}) · ‖W^B_{:,j}‖²      (unbiased variance over all scored tokens n)

Run once on safety data (I_S) and once on utility data (I_U); :class:`ssah_peft.UnitMap` turns the pair into unit
types. For comparison, the per-weight scores Wei et al. (2024) used are aggregated per unit:

* ``"wanda"``: |W_ij|·‖X_j‖ summed over the rows of column j, i.e. RMS_n(X_{n,j}) · Σ_i |W_ij|. The root mean
  square (‖X_j‖₂/√N, as in Wei et al.'s code) rather than ‖X_j‖₂ keeps data sets of different sizes comparable;
  within one data set both rank identically.
* ``"snip"``: |W ⊙ ∇_W ℓ(x)| summed over column j and averaged over calibration sequences x, where ℓ(x) is the
  mean causal-LM loss of the sequence's scored tokens (as targets), as in Wei et al.'s code.

The pass is streaming and exact: hooks on the output projections merge per-batch float64 moments (count, mean,
M2) with Chan et al.'s parallel formula, so any batching, padding side, device placement or number of
``torch.distributed`` ranks gives the scores of a one-shot computation on the concatenated tokens. The same
statistics (:class:`UnitStatistics`) can be saved per shard by independent jobs (:func:`save_partial_scores`) and
merged later (:func:`merge_partial_scores`), with the same result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from ._files import canonical_json, read_safetensors, safetensors_bytes, write_atomic
from .quantization import dense_weight, disable_cpu_4bit_repacking
from .tuner.model import model_shapes
from .units import ArchitectureSpec, _text_config, resolve_architecture

ScoringMethod = Literal["variance", "wanda", "snip"]
SCORING_METHODS: tuple[str, ...] = ("variance", "wanda", "snip")
TokenSelection = Literal["response", "prompt", "both"]
TOKEN_SELECTIONS: tuple[str, ...] = ("response", "prompt", "both")

#: A minimal chat template for tokenizers that have none (base models): "User: ...\nAssistant: ...".
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token if eos_token else '' }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

CalibrationPair = Union[tuple[str, str], Mapping[str, str]]
Batch = Mapping[str, Any]
PerBlock = dict[str, tuple[torch.Tensor, ...]]

PARTIAL_FILE_FORMAT = "ssah_peft.PartialScores"
PARTIAL_FILE_FORMAT_VERSION = "2"  # 2: the weights' sha256 is recorded per set


# ----------------------------------------------------------------------------------------------------
# Calibration batches
# ----------------------------------------------------------------------------------------------------


def build_calibration_batches(
    tokenizer: Any,
    pairs: Iterable[CalibrationPair],
    *,
    tokens: TokenSelection = "response",
    batch_size: int = 8,
    max_length: int = 1024,
    chat_template: Optional[str] = None,
    system_prompt: Optional[str] = None,
    padding_side: Optional[Literal["left", "right"]] = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize (prompt, response) pairs with a chat template into padded batches for :func:`score_units`.

    The prompt is rendered as a user turn followed by the generation prompt, the response as the rest of the
    rendered conversation; both parts are tokenized separately (``add_special_tokens=False``: the template
    carries BOS/EOS), so the split is exact and the prompt tokens are those the model sees when generating.

    Args:
        tokenizer: a transformers tokenizer.
        pairs: ``(prompt, response)`` tuples or mappings with ``"prompt"`` and ``"response"`` keys, in order.
        tokens: which tokens are scored: ``"response"``, ``"prompt"`` or ``"both"``.
        batch_size: sequences per batch (the last batch may be smaller). Batching does not change the scores.
        max_length: sequences are cut to this many tokens from the right (prompt first, then response).
        chat_template: a Jinja chat template overriding the tokenizer's, e.g. :data:`PLAIN_CHAT_TEMPLATE` for a
            tokenizer without one.
        system_prompt: optional system message put before every prompt.
        padding_side: ``"left"`` or ``"right"``; default: the tokenizer's.

    Returns:
        A list of batches ``{"input_ids", "attention_mask", "position_ids", "score_mask"}`` (CPU tensors;
        ``score_mask`` is boolean and ``False`` on padding). Position ids count real tokens only, so left and
        right padding give the same activations.
    """
    if tokens not in TOKEN_SELECTIONS:
        raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {tokens!r}")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "The tokenizer has no chat template. Pass chat_template=... (a Jinja template; "
            "ssah_peft.scoring.PLAIN_CHAT_TEMPLATE renders 'User: ...\\nAssistant: ...' for base models)."
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token to pad with; set tokenizer.pad_token")
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    sequences = [
        _tokenize_pair(tokenizer, template, system_prompt, _as_pair(pair), tokens, max_length) for pair in pairs
    ]
    if not sequences:
        raise ValueError("No calibration pairs were given")
    return [_pad(sequences[i : i + batch_size], pad_id, side) for i in range(0, len(sequences), batch_size)]


def _as_pair(pair: CalibrationPair) -> tuple[str, str]:
    if isinstance(pair, Mapping):
        return pair["prompt"], pair["response"]
    prompt, response = pair
    return prompt, response


def calibration_data_hash(pairs: Iterable[CalibrationPair]) -> str:
    """sha256 (hex) of a calibration set's content: its (prompt, response) pairs, in order.

    Tuples and mappings with the same text hash alike. Shards scored by independent jobs record the hash of the
    whole set in their metadata (``metadata={"data_sha256": ...}``, as ``ssah-peft score`` does), so that
    :func:`merge_partial_scores` refuses shards of data that changed between the jobs.
    """
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(_as_pair(pair), ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _tokenize_pair(
    tokenizer: Any,
    template: str,
    system_prompt: Optional[str],
    pair: tuple[str, str],
    tokens: TokenSelection,
    max_length: int,
) -> tuple[list[int], list[bool]]:
    prompt, response = pair
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    prompt_text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], chat_template=template, tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "The chat template renders the prompt differently with and without the response, so prompt and "
            f"response tokens cannot be told apart. Prompt render: {prompt_text!r}; full render: {full_text!r}"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    scored = [tokens == "both" or (tokens == "prompt") == (i < len(prompt_ids)) for i in range(len(ids))]
    return ids, scored


def _pad(sequences: Sequence[tuple[list[int], list[bool]]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    score_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, (ids, scored) in enumerate(sequences):
        span = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
        score_mask[row, span] = torch.tensor(scored, dtype=torch.bool)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "score_mask": score_mask,
    }


# ----------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module, spec: Optional[ArchitectureSpec] = None) -> dict[str, Any]:
    """What a unit index means in ``model``: model type, layer count, hidden sizes and block widths."""
    spec = spec if spec is not None else resolve_architecture(model.config)
    return {
        "model_type": getattr(_text_config(model.config), "model_type", None),
        **model_shapes(model, spec),
    }


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
        accumulators = {kind: [_merged(self.method, [s]) for s in states] for kind, states in self.states.items()}
        first = next(iter(accumulators.values()))[0]
        if first.num_tokens == 0:
            raise ValueError("The calibration dataloader yielded no batches: nothing to score")
        scores = {}
        for kind, layers in accumulators.items():
            weights = self.weight_statistics.get(kind, (None,) * len(layers))  # none for snip
            scores[kind] = tuple(_unit_score(self.method, a, w) for a, w in zip(layers, weights))
        return UnitScores(
            scores=scores,
            method=self.method,
            num_tokens=first.num_tokens,
            num_sequences=first.num_sequences,
            fingerprint=dict(self.fingerprint),
            metadata=dict(self.metadata),
        )


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


def score_units(
    model: nn.Module,
    dataloader: Iterable[Batch],
    *,
    method: ScoringMethod = "variance",
    forward_fn: Callable[[nn.Module, dict[str, Any]], Any] = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Batch], tuple[dict[str, Any], torch.Tensor]] = (
        prepare_model_inputs_fn_language_modeling
    ),
    architecture: Optional[ArchitectureSpec] = None,
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
) -> UnitScores:
    """Score every unit of ``model`` on the calibration batches of ``dataloader`` (one pass).

    Args:
        model: a transformers causal LM (fp32/bf16/fp16, bitsandbytes 4/8-bit, any ``device_map``), not wrapped
            by peft adapters (merge them first). Its train/eval state is restored afterwards.
        dataloader: batches as produced by :func:`build_calibration_batches`, or any iterable of mappings that
            ``prepare_model_inputs_fn`` understands. Under ``torch.distributed`` each rank passes its own shard.
        method: ``"variance"`` (the paper's Eq. 1), ``"wanda"`` or ``"snip"`` (module docstring).
        forward_fn: ``forward_fn(model, inputs)`` runs the model; for ``"snip"`` its output must have ``logits``.
        prepare_model_inputs_fn: ``batch -> (model inputs, [batch, seq] bool mask of the tokens to score)``.
            Inputs are moved to the device of the input embeddings. For ``"snip"`` they must hold ``input_ids``.
        architecture: where the units are; resolved from ``model.config`` when not given.
        gather_distributed_inputs: if ``torch.distributed`` is initialized, merge the statistics of all ranks so
            every rank returns the scores of the union of the shards. Set ``False`` when ranks see the same data.
        show_progress_bar: show a tqdm bar over the batches.
        metadata: description of the calibration data, stored in :attr:`UnitScores.metadata`.

    Raises:
        ValueError: no batches, a batch without any token to score, fewer than two scored tokens, non-finite
            activations or loss, or a model whose output projections are wrapped by adapters.
    """
    return _statistics_pass(
        model,
        dataloader,
        method=method,
        forward_fn=forward_fn,
        prepare_model_inputs_fn=prepare_model_inputs_fn,
        architecture=architecture,
        gather_distributed_inputs=gather_distributed_inputs,
        show_progress_bar=show_progress_bar,
        metadata=metadata,
        hash_weights=False,  # scores do not record the weights; only shard files are compared by them
    ).finalize()


def unit_statistics(
    model: nn.Module,
    dataloader: Iterable[Batch],
    *,
    method: ScoringMethod = "variance",
    forward_fn: Callable[[nn.Module, dict[str, Any]], Any] = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Batch], tuple[dict[str, Any], torch.Tensor]] = (
        prepare_model_inputs_fn_language_modeling
    ),
    architecture: Optional[ArchitectureSpec] = None,
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
) -> UnitStatistics:
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
    return _statistics_pass(
        model,
        dataloader,
        method=method,
        forward_fn=forward_fn,
        prepare_model_inputs_fn=prepare_model_inputs_fn,
        architecture=architecture,
        gather_distributed_inputs=gather_distributed_inputs,
        show_progress_bar=show_progress_bar,
        metadata=metadata,
        hash_weights=True,
    )


def _statistics_pass(
    model: nn.Module,
    dataloader: Iterable[Batch],
    *,
    method: str,
    forward_fn: Callable[[nn.Module, dict[str, Any]], Any],
    prepare_model_inputs_fn: Callable[[Batch], tuple[dict[str, Any], torch.Tensor]],
    architecture: Optional[ArchitectureSpec],
    gather_distributed_inputs: bool,
    show_progress_bar: bool,
    metadata: Optional[Mapping[str, Any]],
    hash_weights: bool,
) -> UnitStatistics:
    if method not in SCORING_METHODS:
        raise ValueError(f"method must be one of {SCORING_METHODS}, got {method!r}")
    spec = architecture if architecture is not None else resolve_architecture(model.config)
    fingerprint = model_fingerprint(model, spec)
    disable_cpu_4bit_repacking(model)  # before any forward: dense_weight must dequantize the standard layout
    projections = _attach_projections(model, spec, method)
    weights_sha256 = model_weights_hash(model) if hash_weights else None
    training_states = {module: module.training for module in model.modules()}
    model.eval()
    batch_tokens = _BatchTokens(targets_only=method == "snip")
    for projection in projections:
        projection.register(batch_tokens)
    try:
        device = _input_device(model)
        progress = tqdm(dataloader, desc=f"Scoring units ({method})", disable=not show_progress_bar)
        for batch_index, batch in enumerate(progress):
            inputs, mask = prepare_model_inputs_fn(batch)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            batch_tokens.set(mask, batch_index)
            if method == "snip":
                _snip_backward(model, forward_fn, inputs, batch_tokens, batch_index)
            else:
                with torch.no_grad():
                    forward_fn(model, inputs)
            for projection in projections:
                projection.accumulator.end_batch(batch_tokens)
    finally:
        for projection in projections:
            projection.remove()
        for module, training in training_states.items():
            module.training = training
    if gather_distributed_inputs and _distributed():
        _merge_across_ranks([p.accumulator for p in projections])
    for projection in projections:
        projection.check_finite()
    return UnitStatistics(
        method=method,
        states=_per_block((p.kind, p.layer, p.accumulator.state()) for p in projections),
        weight_statistics=_per_block(
            (p.kind, p.layer, p.weight_statistic.cpu()) for p in projections if p.weight_statistic is not None
        ),
        fingerprint=fingerprint,
        metadata=dict(metadata or {}),
        weights_sha256=weights_sha256,
    )


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


# ----------------------------------------------------------------------------------------------------
# Partial score files: shards scored by independent jobs
# ----------------------------------------------------------------------------------------------------


def save_partial_scores(
    path: Union[str, Path], statistics: Mapping[str, UnitStatistics], *, rank: int, world_size: int
) -> None:
    """Write the statistics of shard ``rank`` of ``world_size`` to one safetensors file.

    Args:
        path: the file to write.
        statistics: the shard's :func:`unit_statistics` per calibration set, e.g. ``{"safety": ..., "utility":
            ...}``; every shard's file must hold the same sets.
        rank, world_size: which shard this is, so that :func:`merge_partial_scores` can tell a missing or
            repeated shard from a complete set.

    The same statistics always give the same bytes, and the file is replaced atomically (a killed save leaves
    the previous file; see :mod:`ssah_peft._files`).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank {rank} of world size {world_size}")
    tensors = {}
    for name, part in statistics.items():
        if not name or "." in name:
            raise ValueError(f"calibration set names must be non-empty and without '.', got {name!r}")
        for group, per_block in (("state", part.states), ("weight", part.weight_statistics)):
            for kind, layers in per_block.items():
                for layer, tensor in enumerate(layers):
                    tensors[f"{name}.{group}.{layer}.{kind}"] = tensor.contiguous()
    from . import __version__

    metadata = {
        "format": PARTIAL_FILE_FORMAT,
        "format_version": PARTIAL_FILE_FORMAT_VERSION,
        "ssah_peft_version": __version__,
        "rank": str(rank),
        "world_size": str(world_size),
        "sets": canonical_json({name: _description(part) for name, part in statistics.items()}),
    }
    write_atomic(path, safetensors_bytes(tensors, metadata))


def merge_partial_scores(paths: Sequence[Union[str, Path]]) -> dict[str, UnitScores]:
    """The scores of one pass over all shards, from the files :func:`save_partial_scores` wrote for them.

    The shards' statistics are merged exactly in rank order, so the scores equal those of a single run over all
    the calibration data (to float64 rounding).

    Returns:
        :class:`UnitScores` per calibration set.

    Raises:
        ValueError: no files; a file that is not a partial score file; files from different world sizes; a rank
            missing or given twice; files that disagree on their calibration sets, or within a set on the
            method, the model (fingerprint or weights: :attr:`UnitStatistics.weights_sha256`), the calibration data
            (``metadata["data_sha256"]``) or the rest of the metadata describing the data and settings.
    """
    if not paths:
        raise ValueError("No partial score files were given")
    parts = sorted((_load_partial(path) for path in paths), key=lambda part: part[1])
    world_sizes = {world_size for _, _, world_size, _ in parts}
    if len(world_sizes) > 1:
        found = ", ".join(f"{path}: rank {rank} of {world_size}" for path, rank, world_size, _ in parts)
        raise ValueError(f"The partial score files come from different world sizes: {found}")
    world_size = world_sizes.pop()
    for (first, rank, _, _), (second, next_rank, _, _) in zip(parts, parts[1:]):
        if rank == next_rank:
            raise ValueError(f"Rank {rank} of {world_size} is given twice: {first} and {second}")
    missing = sorted(set(range(world_size)) - {rank for _, rank, _, _ in parts})
    if missing:
        raise ValueError(
            f"Rank(s) {missing} of {world_size} are missing; the scores need every shard (given: "
            + ", ".join(f"{path}: rank {rank}" for path, rank, _, _ in parts)
            + ")"
        )
    reference_path, _, _, reference = parts[0]
    for path, _, _, sets in parts[1:]:
        if sets.keys() != reference.keys():
            raise ValueError(
                f"{reference_path} holds the calibration sets {sorted(reference)} but {path} holds {sorted(sets)}"
            )
        for name, part in sets.items():
            _check_same_pass(name, (reference_path, reference[name]), (path, part))
    merged = {}
    for name, first in reference.items():
        shards = [sets[name] for _, _, _, sets in parts]
        states = {
            kind: tuple(_merged(first.method, per_rank).state() for per_rank in zip(*(s.states[kind] for s in shards)))
            for kind in first.states
        }
        merged[name] = replace(first, states=states).finalize()
    return merged


def _load_partial(path: Union[str, Path]) -> tuple[str, int, int, dict[str, UnitStatistics]]:
    """``(path, rank, world size, statistics per calibration set)`` of a file :func:`save_partial_scores` wrote."""
    with read_safetensors(path, "a partial score file") as f:
        header = f.metadata() or {}
        if header.get("format") != PARTIAL_FILE_FORMAT:
            raise ValueError(f"{path} is not an ssah-peft partial score file (format: {header.get('format')!r})")
        if header.get("format_version") != PARTIAL_FILE_FORMAT_VERSION:
            raise ValueError(
                f"{path} has partial score format version {header.get('format_version')!r}; this ssah-peft reads "
                f"version {PARTIAL_FILE_FORMAT_VERSION} (score the shard again with this version)"
            )
        entries: dict[tuple[str, str], list[tuple[str, int, torch.Tensor]]] = {}
        for key in f.keys():
            parts = key.split(".")
            if len(parts) != 4 or parts[1] not in ("state", "weight") or not parts[2].isdigit():
                raise ValueError(
                    f"{path} holds an unexpected tensor {key!r} (expected <set>.state|weight.<layer>.<kind>)"
                )
            name, group, layer, kind = parts
            entries.setdefault((name, group), []).append((kind, int(layer), f.get_tensor(key)))
    try:
        sets = json.loads(header["sets"])
        rank, world_size = int(header["rank"]), int(header["world_size"])
        statistics = {
            name: UnitStatistics(
                states=_per_block(entries.get((name, "state"), [])),
                weight_statistics=_per_block(entries.get((name, "weight"), [])),
                **description,
            )
            for name, description in sets.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(
            f"{path}: the header of this partial score file is damaged ({type(error).__name__}: {error})"
        ) from None
    return str(path), rank, world_size, statistics


def _description(statistics: UnitStatistics) -> dict[str, Any]:
    """What a partial score file keeps of a set besides its tensors (JSON)."""
    return {
        "method": statistics.method,
        "fingerprint": statistics.fingerprint,
        "metadata": statistics.metadata,
        "weights_sha256": statistics.weights_sha256,
    }


def _check_same_pass(name: str, a: tuple[str, UnitStatistics], b: tuple[str, UnitStatistics]) -> None:
    """Shards of one calibration set must come from one model, method and data description."""
    (path_a, first), (path_b, second) = a, b
    data_a, data_b = first.metadata.get("data_sha256"), second.metadata.get("data_sha256")
    if data_a != data_b:
        raise ValueError(
            f"The calibration data of {name!r} changed between the shard jobs: {path_a} scored data with sha256 "
            f"{_short_hash(data_a)}, {path_b} data with sha256 {_short_hash(data_b)} (data: "
            f"{first.metadata.get('data')!r}, {second.metadata.get('data')!r}). Score every shard again on the same "
            "data."
        )
    for what, value_a, value_b in (
        ("methods", first.method, second.method),
        ("models (fingerprints)", first.fingerprint, second.fingerprint),
        ("data or settings (metadata)", first.metadata, second.metadata),
    ):
        if value_a != value_b:
            raise ValueError(
                f"The partial scores of {name!r} come from different {what}: {path_a}: {value_a!r}, "
                f"{path_b}: {value_b!r}"
            )
    same_weights = all(
        torch.allclose(x, y, rtol=1e-9, atol=0)
        for kind, layers in first.weight_statistics.items()
        for x, y in zip(layers, second.weight_statistics[kind])
    )
    if not same_weights:
        raise ValueError(
            f"The partial scores of {name!r} come from different models: the output projection weights of "
            f"{path_a} and {path_b} differ (same architecture, other checkpoint?)"
        )
    if first.weights_sha256 != second.weights_sha256:
        raise ValueError(
            f"The partial scores of {name!r} come from different model weights: {path_a} "
            f"(sha256 {_short_hash(first.weights_sha256)}) and {path_b} (sha256 {_short_hash(second.weights_sha256)}); "
            "same architecture, another checkpoint or modified weights? Score every shard with the same model."
        )


def _short_hash(value: Optional[str]) -> str:
    return "not recorded" if value is None else f"{value[:12]}…"


# ----------------------------------------------------------------------------------------------------
# Hooks and running statistics
# ----------------------------------------------------------------------------------------------------


class _BatchTokens:
    """The tokens to score in the current batch, as flat indices into ``[batch * seq]`` on every device needed.

    For SNIP a scored token counts as a loss target, so the first position of a sequence never counts.
    """

    def __init__(self, targets_only: bool) -> None:
        self.targets_only = targets_only
        self.mask = torch.zeros(0, 0, dtype=torch.bool)
        self.num_tokens = 0
        self.num_sequences = 0
        self._index_by_device: dict[torch.device, torch.Tensor] = {}

    def set(self, mask: torch.Tensor, batch_index: int) -> None:
        if mask.dim() != 2:
            raise ValueError(f"The token mask must be [batch, seq], got shape {tuple(mask.shape)}")
        self.mask = mask.bool()
        counted = self.mask[:, 1:] if self.targets_only else self.mask
        self.num_tokens = int(counted.sum())
        if self.num_tokens == 0:
            raise ValueError(
                f"Calibration batch {batch_index} has no token to score (all padding, or the score mask selects "
                "nothing, e.g. tokens='response' with responses cut off by max_length"
                + ("; SNIP scores loss targets, never a sequence's first token)" if self.targets_only else ")")
            )
        self.num_sequences = int(counted.any(dim=1).sum())
        self._index_by_device = {}

    def index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index_by_device:
            self._index_by_device[device] = self.mask.flatten().nonzero().flatten().to(device)
        return self._index_by_device[device]

    def select(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The scored rows of a ``[batch, seq, width]`` layer input, as a new ``[tokens, width]`` tensor."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.mask.numel():
            raise ValueError(
                f"{name} received {flat.shape[0]} token positions but the token mask has {self.mask.numel()} "
                f"(shape {tuple(self.mask.shape)}); prepare_model_inputs_fn must return a [batch, seq] mask"
            )
        return flat.index_select(0, self.index(flat.device))


class _Moments:
    """Per-channel count, mean and M2 (sum of squared deviations) in float64, merged exactly (Chan et al.)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.num_tokens = 0
        self.num_sequences = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add_tokens(self, x: torch.Tensor) -> None:
        """Merge a ``[tokens, width]`` batch (a copy the caller gives up: it is modified in place)."""
        x = x.double()
        mean = x.mean(dim=0)
        # two passes over the batch; several times faster on CPU than torch.var_mean's strided reduction
        self._merge(x.shape[0], mean, x.sub_(mean).square_().sum(dim=0))

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if count == 0:
            return
        if self.mean is None or self.m2 is None or self.num_tokens == 0:
            self.num_tokens, self.mean, self.m2 = count, mean, m2
            return
        mean = mean.to(self.mean.device)
        total = self.num_tokens + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2.to(self.m2.device) + delta.square() * (self.num_tokens * count / total)
        self.num_tokens = total

    def end_batch(self, tokens: _BatchTokens) -> None:
        self.num_sequences += tokens.num_sequences  # tokens were counted when merged

    def unbiased_variance(self) -> torch.Tensor:
        if self.m2 is None or self.num_tokens < 2:
            raise ValueError("The variance needs at least two scored tokens; the calibration set has fewer")
        return self.m2 / (self.num_tokens - 1)

    def root_mean_square(self) -> torch.Tensor:
        """‖X_j‖₂ / √N, from M2 + N·mean² = Σ_n X_nj²."""
        if self.m2 is None or self.mean is None:
            raise ValueError("No token was scored")
        return ((self.m2 + self.num_tokens * self.mean.square()) / self.num_tokens).sqrt()

    def state(self) -> torch.Tensor:
        zeros = torch.zeros(self.width, dtype=torch.float64)
        mean = zeros if self.mean is None else self.mean.cpu()
        m2 = zeros if self.m2 is None else self.m2.cpu()
        return torch.cat([torch.tensor([self.num_tokens, self.num_sequences], dtype=torch.float64), mean, m2])

    def load_states(self, states: Sequence[torch.Tensor]) -> None:
        """Replace the statistics by the exact merge of several :meth:`state` vectors, in order."""
        self.num_tokens, self.num_sequences, self.mean, self.m2 = 0, 0, None, None
        for state in states:
            self._merge(int(state[0]), state[2 : 2 + self.width], state[2 + self.width :])
            self.num_sequences += int(state[1])


class _Saliency:
    """SNIP: running sum over sequences of Σ_i |W_ij · ∂ℓ(x)/∂W_ij| per unit j, in float64."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.num_tokens = 0
        self.num_sequences = 0
        self.total = torch.zeros(width, dtype=torch.float64)

    def add_sequences(self, per_sequence_gradients: Iterable[torch.Tensor], weight: torch.Tensor) -> None:
        magnitude = weight.abs().to(_compute_dtype(weight.dtype))
        total = self.total.to(weight.device)
        for gradient in per_sequence_gradients:
            total += (magnitude * gradient.abs()).sum(dim=0, dtype=torch.float64)
        self.total = total

    def end_batch(self, tokens: _BatchTokens) -> None:
        self.num_tokens += tokens.num_tokens
        self.num_sequences += tokens.num_sequences

    def state(self) -> torch.Tensor:
        counts = torch.tensor([self.num_tokens, self.num_sequences], dtype=torch.float64)
        return torch.cat([counts, self.total.cpu()])

    def load_states(self, states: Sequence[torch.Tensor]) -> None:
        self.num_tokens = int(sum(int(s[0]) for s in states))
        self.num_sequences = int(sum(int(s[1]) for s in states))
        self.total = torch.stack([s[2:] for s in states]).sum(dim=0)

    def mean(self) -> torch.Tensor:
        return self.total / self.num_sequences


Accumulator = Union[_Moments, _Saliency]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models, the model's own precision above."""
    return torch.promote_types(dtype, torch.float32)


class _OutputProjection:
    """One block's output projection B, its weight statistic and the running statistics of its hook."""

    def __init__(self, name: str, module: nn.Module, layer: int, kind: str, method: str) -> None:
        self.name, self.module, self.layer, self.kind, self.method = name, module, layer, kind, method
        weight = dense_weight(module)  # once: for 4-bit layers, a single dequantization
        if weight.is_meta:
            raise ValueError(
                f"{name} is offloaded (its weight is on the meta device, as accelerate does for modules that "
                "device_map puts on 'cpu' or 'disk' next to GPUs); score the model without offloading"
            )
        self.width = int(weight.shape[1])
        self.accumulator: Accumulator = _Saliency(self.width) if method == "snip" else _Moments(self.width)
        self.weight_statistic: Optional[torch.Tensor] = None  # snip: the weights enter the saliency sums
        if method == "variance":
            self.weight_statistic = weight.double().square().sum(dim=0)  # ‖W_{:,j}‖²
        elif method == "wanda":
            self.weight_statistic = weight.double().abs().sum(dim=0)  # Σ_i |W_ij|
        self._handle: Optional[torch.utils.hooks.RemovableHandle] = None

    def register(self, tokens: _BatchTokens) -> None:
        if isinstance(self.accumulator, _Saliency):
            self._handle = self.module.register_forward_hook(_gradient_hook(self.accumulator))
        else:
            self._handle = self.module.register_forward_pre_hook(_moment_hook(self.accumulator, tokens, self.name))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def check_finite(self) -> None:
        """Raise if NaN/inf reached the statistics, naming the projection: its scores would be meaningless."""
        values = [self.accumulator.state()]
        if self.weight_statistic is not None:
            values.append(self.weight_statistic)
        if not all(torch.isfinite(v).all() for v in values):
            raise ValueError(
                f"Non-finite (NaN/inf) {'gradients' if self.method == 'snip' else 'activations'} at the input of "
                f"{self.name}: the model produces NaN/inf on the calibration data (fp16 overflow? corrupted "
                "weights?)"
            )


def _unit_score(method: str, accumulator: Accumulator, weight_statistic: Optional[torch.Tensor]) -> torch.Tensor:
    """One block's scores from its merged statistics (module docstring)."""
    if isinstance(accumulator, _Saliency):
        return accumulator.mean()
    if weight_statistic is None:
        raise ValueError(f"{method} scores need the weight statistics of the output projections; none were given")
    activation = accumulator.unbiased_variance() if method == "variance" else accumulator.root_mean_square()
    return activation * weight_statistic


def _merged(method: str, states: Sequence[torch.Tensor]) -> Accumulator:
    """A CPU accumulator of ``method``'s kind holding the exact merge of ``states`` (:meth:`state` vectors)."""
    size = states[0].numel() - 2  # two counts, then one (saliency) or two (mean, M2) entries per unit
    accumulator: Accumulator = _Saliency(size) if method == "snip" else _Moments(size // 2)
    accumulator.load_states(states)
    return accumulator


def _per_block(entries: Iterable[tuple[str, int, torch.Tensor]]) -> PerBlock:
    """``{kind: (layer 0, layer 1, ...)}`` from ``(kind, layer, tensor)`` entries in any order; kinds sorted, so
    statistics from a pass and from a file list them alike."""
    by_kind: dict[str, dict[int, torch.Tensor]] = {}
    for kind, layer, tensor in entries:
        by_kind.setdefault(kind, {})[layer] = tensor
    return {kind: tuple(by_kind[kind][i] for i in sorted(by_kind[kind])) for kind in sorted(by_kind)}


def _moment_hook(moments: _Moments, tokens: _BatchTokens, name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        moments.add_tokens(tokens.select(args[0].detach(), name))

    return hook


def _gradient_hook(saliency: _Saliency) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0].detach()

        def on_gradient(grad_output: torch.Tensor) -> None:
            # ∇_W ℓ(x) of one sequence = Σ_t g_t x_tᵀ; sequences are separable (causal masks), so one
            # backward of Σ_x ℓ(x) yields every per-sequence gradient
            dtype = _compute_dtype(x.dtype)
            g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1]).to(dtype)
            inputs = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
            per_sequence = (g[s].T @ inputs[s] for s in range(g.shape[0]))
            saliency.add_sequences(per_sequence, dense_weight(module))

        if output.requires_grad:
            output.register_hook(on_gradient)

    return hook


def _attach_projections(model: nn.Module, spec: ArchitectureSpec, method: str) -> list[_OutputProjection]:
    projections = []
    for kind, layer, name, module in spec.output_projections(model):
        if isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"{name} is wrapped by a peft adapter; score the base model, or merge the adapters first "
                "(model.merge_and_unload(), or ssah_peft.merge_and_dequantize for a quantized base)"
            )
        projections.append(_OutputProjection(name, module, layer, kind, method))
    return sorted(projections, key=lambda p: (p.layer, p.kind))


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _snip_backward(
    model: nn.Module,
    forward_fn: Callable[[nn.Module, dict[str, Any]], Any],
    inputs: dict[str, Any],
    tokens: _BatchTokens,
    batch_index: int,
) -> None:
    """Backward of Σ_x ℓ(x) to the input embeddings only (no parameter gradients are accumulated)."""
    if "input_ids" not in inputs:
        raise ValueError("method='snip' needs input_ids in the model inputs (the targets of the loss)")
    captured: list[torch.Tensor] = []

    def require_grad(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        output = output if output.requires_grad else output.detach().requires_grad_()
        captured.append(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(require_grad)
    try:
        with torch.enable_grad():
            output = forward_fn(model, inputs)
            logits = output.logits if hasattr(output, "logits") else output[0]
            loss = _sequence_losses(logits, inputs["input_ids"], tokens.mask.to(logits.device))
            if not torch.isfinite(loss):
                raise ValueError(f"Calibration batch {batch_index}: the loss is not finite ({loss.item()})")
            torch.autograd.grad(loss, captured)
    finally:
        handle.remove()


def _sequence_losses(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over sequences of the mean cross-entropy of their scored tokens, each predicted from the previous one."""
    dtype = _compute_dtype(logits.dtype)
    targets = input_ids[:, 1:].to(logits.device)
    target_mask = mask[:, 1:].to(dtype)
    token_loss = F.cross_entropy(logits[:, :-1].to(dtype).transpose(1, 2), targets, reduction="none")
    per_sequence = (token_loss * target_mask).sum(dim=1) / target_mask.sum(dim=1).clamp(min=1)
    return per_sequence.sum()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _merge_across_ranks(accumulators: Sequence[Accumulator]) -> None:
    """Gather every rank's statistics (one collective) and merge them in rank order on every rank."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    states = [a.state() for a in accumulators]
    local = torch.cat(states).to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    sizes = [s.numel() for s in states]
    per_rank = [torch.split(g.cpu(), sizes) for g in gathered]
    for i, accumulator in enumerate(accumulators):
        accumulator.load_states([states[i] for states in per_rank])
