"""Unit scores that attribute safety to units directly, for the frontier's attack-aware choosers (issue 26).

The variance, Wanda and SNIP scores (:mod:`.scorer`) rank units by how much they matter on safety data and on
utility data, and a chooser contrasts the two. The scores here ask the question the frontier asks more directly,
each in one number per unit:

* :func:`refusal_direction_scores`: the difference-in-means refusal direction (Arditi et al. 2024, arXiv
  2406.11717) r_l = mean h_l(harmful) − mean h_l(harmless) of the residual stream at the output of decoder layer
  l, at the last prompt token (where the model decides to refuse), and each unit's write onto it: how far the
  unit's mean activation moves between harmful and harmless prompts, times how much one unit of its activation
  moves the residual stream along r̂ = r/‖r‖: ``|Δ mean X^B_j| · |r̂ · W^B_{:,j}|``.
* :func:`alignment_delta_scores`: ``‖W_aligned − W_base‖`` over every slice the unit owns (:func:`unit_sums`): where
  an alignment was written into the weights, the scorer-free reference of "where safety was put".
* :func:`margin_attribution_scores`: the attribution of a refusal margin m(x) (log-probability of refusing minus
  of complying), ``Σ_p |θ_p · ∂m(x)/∂θ_p|`` over the unit's parameters, averaged over harmful prompts, minus λ times
  the same on utility prompts, z-scored within each layer and block kind (a unit that moves every margin, harmful
  or not, buys over-refusal rather than safety).
* :func:`conflict_scores`: per unit, ``max(0, −⟨∇_j L_task, ∇_j m⟩) / ‖∇_j L_task‖``: how much refusal margin a
  step along the fine-tuning data's gradient takes away per unit of task progress, through the unit's parameters
  alone; computed from the user's own data, so it is aware of the attack.

Every score comes as :class:`~ssah_peft.scoring.UnitScores` (one float64 tensor per block), the structure the other
scorers give, so a one-score map ranks units by it and the budget choice is the same for every chooser. A unit's
parameters are the weight slices it owns (:func:`ssah_peft.units.unit_slices` with ``rule="any"``: a query head's
rows count for each of its channels); biases are not scored. The margin and the task loss come in as functions
of (model, batch), so this module does not depend on the evaluation layer that defines them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..devices import input_device
from ..quantization import dense_weight
from ..units import ArchitectureSpec, PerBlock, _part_rows, _row_keys, _unit_keys, model_shapes, resolve_architecture
from .accumulators import _sequence_losses
from .results import UnitScores, model_fingerprint

Batch = Mapping[str, Any]
#: ``margin(model, batch)``: the refusal margin of each prompt of ``batch``, a differentiable ``[batch]`` tensor.
MarginFn = Callable[[nn.Module, Batch], torch.Tensor]
#: ``loss(model, batch)``: a differentiable scalar task loss of ``batch``.
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
#: A per-weight quantity in the ``[out_features, in_features]`` convention, by module.
WeightQuantity = Callable[[nn.Module], torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Summing a per-weight quantity over the slices each unit owns
# ----------------------------------------------------------------------------------------------------


def _blocks(model: nn.Module, spec: ArchitectureSpec) -> list[tuple[str, int, str, nn.Module, list[Any]]]:
    """``(kind, layer, decoder layer name, output projection, [(input part, its module)])`` of every block, layer
    by layer."""
    blocks = []
    for kind, layer, name, module in spec.output_projections(model):
        layer_name = name[: len(name) - len(spec.blocks[kind].out_proj) - 1]
        parts = [(part, model.get_submodule(f"{layer_name}.{part.module}")) for part in spec.blocks[kind].in_parts]
        blocks.append((kind, layer, layer_name, module, parts))
    return sorted(blocks, key=lambda block: (block[1], block[0]))


def unit_sums(model: nn.Module, quantity: WeightQuantity, architecture: Optional[ArchitectureSpec] = None) -> PerBlock:
    """Σ of a per-weight ``quantity`` over the slices each unit owns, for every unit of ``model``.

    Unit j owns column j of its block's output projection and the rows of the input projections that produce
    channel j (shared rows count for every unit that reads them, ``unit_slices(rule="any")``). ``quantity(module)``
    is a tensor of the module's weight shape in the ``[out_features, in_features]`` convention (the squared change
    of the weight, say). Returns float64 CPU sums, ``{kind: (layer 0, layer 1, ...)}``.
    """
    spec = architecture if architecture is not None else resolve_architecture(model.config)
    sums: dict[str, list[torch.Tensor]] = {}
    for kind, _, _, out_module, parts in _blocks(model, spec):
        per_unit = quantity(out_module).double().sum(dim=0)
        width = per_unit.numel()
        every_unit = torch.arange(width, device=per_unit.device)
        for part, module in parts:
            rows = quantity(module).double()[part.offset : part.offset + _part_rows(spec, part, width)].sum(dim=1)
            keys = _row_keys(spec, part.sharing, rows.numel()).to(rows.device)
            per_key = torch.zeros(int(keys.max()) + 1, dtype=torch.float64, device=rows.device)
            per_key.index_add_(0, keys, rows)
            per_unit = per_unit + per_key[_unit_keys(spec, part.sharing, every_unit)]
        sums.setdefault(kind, []).append(per_unit.cpu())
    return {kind: tuple(per_layer) for kind, per_layer in sums.items()}


def _unit_scores(
    model: nn.Module,
    spec: ArchitectureSpec,
    per_block: PerBlock,
    method: str,
    sequences: int = 0,
    metadata: Optional[Mapping[str, Any]] = None,
) -> UnitScores:
    """Scores of every unit; ``sequences`` (prompts read) counts as tokens too: one position per prompt."""
    return UnitScores(
        scores=per_block,
        method=method,
        num_tokens=sequences,
        num_sequences=sequences,
        fingerprint=model_fingerprint(model, spec),
        metadata=dict(metadata or {}),
    )


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std(correction=0)
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


@contextmanager
def _in_eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) inside the block, its modules' training flags restored afterwards."""
    training = [module for module in model.modules() if module.training]
    model.eval()
    try:
        yield
    finally:
        for module in training:
            module.training = True


def _model_inputs(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """A calibration batch's model inputs on the model's input device (the mask of scored tokens left out)."""
    device = input_device(model)
    return {k: v.to(device) for k, v in batch.items() if k != "score_mask"}


# ----------------------------------------------------------------------------------------------------
# refusal_direction
# ----------------------------------------------------------------------------------------------------


def last_prompt_positions(batch: Batch) -> torch.Tensor:
    """Per sequence, the index of its last scored token (``score_mask``, else ``attention_mask``): in batches of
    prompt tokens (``build_calibration_batches(tokens="prompt")``) the generation prompt's last token, after which
    the model writes the first word of a refusal or of an answer."""
    mask = batch.get("score_mask", batch.get("attention_mask"))
    if mask is None:
        mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    mask = mask.bool().cpu()
    if not mask.any(dim=1).all():
        raise ValueError("A sequence of the batch has no scored token, hence no last prompt token")
    return torch.where(mask, torch.arange(mask.shape[1]), -1).amax(dim=1)


class _LastTokenSums:
    """Forward hooks summing, over the prompts of a pass, each hooked tensor (a block's input X^B, a decoder
    layer's output) at the prompts' last tokens, in float64."""

    def __init__(self) -> None:
        self.totals: dict[Any, torch.Tensor] = {}
        self.positions = torch.empty(0, dtype=torch.long)
        self.prompts = 0

    def add(self, key: Any, x: torch.Tensor) -> None:
        rows = torch.arange(x.shape[0], device=x.device)
        picked = x.detach()[rows, self.positions.to(x.device)].double().sum(dim=0)
        self.totals[key] = self.totals[key] + picked if key in self.totals else picked

    def input_hook(self, key: Any) -> Callable[..., None]:
        return lambda module, args: self.add(key, args[0])

    def output_hook(self, key: Any) -> Callable[..., None]:
        return lambda module, args, output: self.add(key, output[0] if isinstance(output, tuple) else output)

    def means(self) -> dict[Any, torch.Tensor]:
        return {key: total / self.prompts for key, total in self.totals.items()}


def refusal_direction_scores(
    model: nn.Module,
    harmful: Iterable[Batch],
    harmless: Iterable[Batch],
    *,
    architecture: Optional[ArchitectureSpec] = None,
    show_progress_bar: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
) -> UnitScores:
    """``|Δ mean X^B_j| · |r̂_l · W^B_{:,j}|`` for every unit (module docstring), Δ = harmful − harmless.

    Args:
        model: a causal LM.
        harmful, harmless: batches as :func:`ssah_peft.build_calibration_batches` gives them with
            ``tokens="prompt"``; each sequence is read at its last scored token (:func:`last_prompt_positions`).
        architecture: where the units are; resolved from ``model.config`` when not given.
        show_progress_bar: a tqdm bar over each set's batches.
        metadata: description of the prompts, kept in the scores.
    """
    spec = architecture if architecture is not None else resolve_architecture(model.config)
    blocks = _blocks(model, spec)
    means, prompts = {}, 0
    for which, batches in (("harmful", harmful), ("harmless", harmless)):
        sums = _LastTokenSums()
        handles = [out.register_forward_pre_hook(sums.input_hook((kind, layer))) for kind, layer, _, out, _ in blocks]
        for layer, name in {layer: name for _, layer, name, _, _ in blocks}.items():
            handles.append(model.get_submodule(name).register_forward_hook(sums.output_hook(layer)))
        try:
            with torch.no_grad(), _in_eval_mode(model):
                for batch in tqdm(batches, desc=f"Refusal direction ({which})", disable=not show_progress_bar):
                    sums.positions = last_prompt_positions(batch)
                    model(**_model_inputs(model, batch))
                    sums.prompts += sums.positions.numel()
        finally:
            for handle in handles:
                handle.remove()
        if not sums.prompts:
            raise ValueError(f"No {which} prompts: the refusal direction needs harmful and harmless ones")
        means[which], prompts = sums.means(), prompts + sums.prompts
    scores: dict[str, list[torch.Tensor]] = {}
    for kind, layer, _, out_module, _ in blocks:
        direction = means["harmful"][layer] - means["harmless"][layer]
        direction = direction / direction.norm() if direction.norm() > 0 else direction
        shift = means["harmful"][(kind, layer)] - means["harmless"][(kind, layer)]
        write = direction @ dense_weight(out_module).double().to(direction.device)
        scores.setdefault(kind, []).append(shift.abs().cpu() * write.abs().cpu())
    return _unit_scores(model, spec, {k: tuple(v) for k, v in scores.items()}, "refusal_direction", prompts, metadata)


# ----------------------------------------------------------------------------------------------------
# alignment_delta
# ----------------------------------------------------------------------------------------------------


def alignment_delta_scores(
    aligned: nn.Module,
    base: nn.Module,
    *,
    architecture: Optional[ArchitectureSpec] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> UnitScores:
    """``‖W_aligned − W_base‖`` over all slices each unit owns (the square root of :func:`unit_sums` of the
    squared change), for the same model before and after an alignment. ``ValueError`` when their shapes differ."""
    spec = architecture if architecture is not None else resolve_architecture(aligned.config)
    shapes = model_shapes(aligned, spec), model_shapes(base, spec)
    if shapes[0] != shapes[1]:
        raise ValueError(f"The aligned and the base model differ in shape ({shapes[0]} vs {shapes[1]})")
    names = {id(module): name for name, module in aligned.named_modules()}

    def squared_change(module: nn.Module) -> torch.Tensor:
        before = dense_weight(base.get_submodule(names[id(module)])).double()
        return (dense_weight(module).double() - before.to(module.weight.device)).square()

    sums = unit_sums(aligned, squared_change, spec)
    per_block = {kind: tuple(s.sqrt() for s in per_layer) for kind, per_layer in sums.items()}
    return _unit_scores(aligned, spec, per_block, "alignment_delta", metadata=metadata)


# ----------------------------------------------------------------------------------------------------
# margin_grad and conflict: products of weights and gradients
# ----------------------------------------------------------------------------------------------------


def response_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The SFT loss of a calibration batch (``build_calibration_batches(tokens="response")``): the mean over its
    sequences of the mean next-token cross-entropy of their response tokens."""
    logits = model(**_model_inputs(model, batch)).logits
    return _sequence_losses(logits, batch["input_ids"], batch["score_mask"].to(logits.device)) / logits.shape[0]


class _UnitWeightGradients:
    """Gradients with respect to the weights of every block's output and input projections.

    Inside ``with``, those weights require gradients and the model is in eval mode (no dropout); both are
    restored afterwards. :meth:`of` differentiates an objective and returns the gradients by module, in the
    ``[out_features, in_features]`` convention that :func:`unit_sums` reads."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec) -> None:
        modules = {id(m): m for _, _, _, out, parts in _blocks(model, spec) for m in (out, *(m for _, m in parts))}
        self.model, self.modules = model, list(modules.values())
        if not all(module.weight.is_floating_point() for module in self.modules):
            raise ValueError("Gradient attribution needs float weights; load the model unquantized")

    def __enter__(self) -> _UnitWeightGradients:
        self.requires_grad = [module.weight.requires_grad for module in self.modules]
        self.eval_mode = _in_eval_mode(self.model)
        self.eval_mode.__enter__()
        for module in self.modules:
            module.weight.requires_grad_(True)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for module, requires_grad in zip(self.modules, self.requires_grad):
            module.weight.requires_grad_(requires_grad)
        self.eval_mode.__exit__(*exc_info)

    def of(self, objective: torch.Tensor, retain_graph: bool = False) -> dict[int, torch.Tensor]:
        weights = [module.weight for module in self.modules]
        gradients = torch.autograd.grad(objective, weights, retain_graph=retain_graph, allow_unused=True)
        return {
            id(module): _as_linear(module, torch.zeros_like(weight) if gradient is None else gradient)
            for module, weight, gradient in zip(self.modules, weights, gradients)
        }


def _as_linear(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of the module's weight shape in the ``[out_features, in_features]`` convention."""
    return tensor.T if isinstance(module, Conv1D) else tensor


def _mean_margin_attribution(
    gradients: _UnitWeightGradients,
    spec: ArchitectureSpec,
    batches: Iterable[Batch],
    margin: MarginFn,
    which: str,
    show_progress_bar: bool,
) -> tuple[PerBlock, int]:
    """Σ_p |θ_p · ∂m(x)/∂θ_p| per unit, averaged over the prompts x of ``batches``: a backward per prompt, through
    the graph of its whole batch, so batches of one prompt cost least. The per-weight terms are summed over the
    prompts first (the sum over a unit's weights is linear), and over each unit's weights once at the end."""
    model = gradients.model
    weights = {id(module): dense_weight(module) for module in gradients.modules}
    totals: dict[int, torch.Tensor] = {}
    prompts = 0
    for batch in tqdm(batches, desc=f"Margin attribution ({which})", disable=not show_progress_bar):
        margins = margin(model, batch)
        for i in range(margins.shape[0]):
            for key, gradient in gradients.of(margins[i], retain_graph=i + 1 < margins.shape[0]).items():
                term = (weights[key] * gradient).abs()
                totals[key] = totals[key].add_(term) if key in totals else term
            prompts += 1
    if not prompts:
        raise ValueError(f"No {which} prompts to attribute the refusal margin on")
    sums = unit_sums(model, lambda module: totals[id(module)], spec)
    return {kind: tuple(t / prompts for t in per_layer) for kind, per_layer in sums.items()}, prompts


def margin_attribution_scores(
    model: nn.Module,
    harmful: Iterable[Batch],
    utility: Iterable[Batch],
    margin: MarginFn,
    *,
    utility_weight: float = 1.0,
    architecture: Optional[ArchitectureSpec] = None,
    show_progress_bar: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
) -> UnitScores:
    """``z(A_harmful − λ·A_utility)``, z-scored within each layer and block kind, with A_set the mean over the
    set's prompts x of Σ_p |θ_p · ∂m(x)/∂θ_p| over the unit's parameters (module docstring).

    Args:
        model: a causal LM with float weights.
        harmful, utility: batches that ``margin`` reads, of harmful and of utility prompts.
        margin: ``margin(model, batch)``, the per-prompt refusal margins of a batch (differentiable).
        utility_weight: λ.
        architecture, show_progress_bar, metadata: as :func:`refusal_direction_scores`.
    """
    spec = architecture if architecture is not None else resolve_architecture(model.config)
    with _UnitWeightGradients(model, spec) as gradients:
        on_harmful, n_harmful = _mean_margin_attribution(gradients, spec, harmful, margin, "harmful", show_progress_bar)
        on_utility, n_utility = _mean_margin_attribution(gradients, spec, utility, margin, "utility", show_progress_bar)
    per_block = {
        kind: tuple(_zscore(h - utility_weight * u) for h, u in zip(on_harmful[kind], on_utility[kind]))
        for kind in on_harmful
    }
    info = {"utility_weight": utility_weight, **(metadata or {})}
    return _unit_scores(model, spec, per_block, "margin_grad", n_harmful + n_utility, info)


def _mean_gradient(
    gradients: _UnitWeightGradients, batches: Iterable[Batch], objective: LossFn, which: str, show_progress_bar: bool
) -> tuple[dict[int, torch.Tensor], int]:
    """The gradient of ``objective`` averaged over ``batches``."""
    total: dict[int, torch.Tensor] = {}
    count = 0
    for batch in tqdm(batches, desc=f"Conflict ({which} gradient)", disable=not show_progress_bar):
        for key, gradient in gradients.of(objective(gradients.model, batch)).items():
            total[key] = total[key] + gradient if key in total else gradient
        count += 1
    if not count:
        raise ValueError(f"No {which} batches for the conflict score")
    return {key: gradient / count for key, gradient in total.items()}, count


def conflict_scores(
    model: nn.Module,
    task: Iterable[Batch],
    harmful: Iterable[Batch],
    margin: MarginFn,
    *,
    task_loss: LossFn = response_loss,
    architecture: Optional[ArchitectureSpec] = None,
    show_progress_bar: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
) -> UnitScores:
    """``max(0, −⟨∇_j L_task, ∇_j m⟩) / ‖∇_j L_task‖`` for every unit j, the inner product and the norm over the
    unit's parameters (0 where the task gradient vanishes on them).

    ∇ L_task is the gradient of ``task_loss`` (default :func:`response_loss`) averaged over the ``task`` batches, a
    sample of the fine-tuning data; ∇ m that of the batches' mean ``margin`` averaged over the ``harmful`` batches.
    Other arguments as :func:`margin_attribution_scores`.
    """
    spec = architecture if architecture is not None else resolve_architecture(model.config)
    with _UnitWeightGradients(model, spec) as gradients:
        task_gradient, n_task = _mean_gradient(gradients, task, task_loss, "task", show_progress_bar)

        def harmful_margin(model: nn.Module, batch: Batch) -> torch.Tensor:
            return margin(model, batch).mean()

        margin_gradient, n_harmful = _mean_gradient(gradients, harmful, harmful_margin, "margin", show_progress_bar)
    inner = unit_sums(model, lambda m: task_gradient[id(m)] * margin_gradient[id(m)], spec)
    squared_norm = unit_sums(model, lambda m: task_gradient[id(m)].square(), spec)
    per_block = {
        kind: tuple(
            torch.where(n > 0, (-i).clamp(min=0) / n.sqrt().clamp(min=torch.finfo(torch.float64).tiny), 0.0)
            for i, n in zip(inner[kind], squared_norm[kind])
        )
        for kind in inner
    }
    info = {"task_batches": n_task, "harmful_batches": n_harmful, **(metadata or {})}
    return _unit_scores(model, spec, per_block, "conflict", metadata=info)
