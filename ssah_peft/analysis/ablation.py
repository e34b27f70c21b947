"""Unit ablation: zero a set of units for the duration of a ``with`` block, and the paper's Table 1.

Li & Kim (arXiv 2410.10862, Table 1) test what each unit type is for by pruning it: removing the safety-critical
units (SCU) should raise the attack success rate far more than removing a random set of the same size, while
utility (perplexity, task accuracy) barely moves; removing utility-critical units (UCU) should ruin utility.

Pruning unit j means zeroing column j of the block's output projection (``parts="out_proj"``): the unit then
writes nothing into the residual stream, whatever it computes. ``parts="all"`` also zeroes every input-side row
the unit reads from (rule ``"any"`` of :func:`ssah_peft.unit_slices`: rows shared with other units, such as a
query head's rows, are zeroed if any of their units is ablated).

:func:`ablate` modifies the weights in place and restores them on exit, also on exceptions: the values it
zeroed are kept and written back (fp weights, bit-exact), and a bitsandbytes 4-bit weight, which must be
dequantized and requantized to be changed, is swapped back to the very parameter object it replaced.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers import PreTrainedTokenizerBase

from .._files import read_json, write_json
from ..evaluate import (
    GenerationSettings,
    evaluate_safety,
    evaluate_utility,
    format_rate,
    holm_adjust,
    prediction_t_test,
    rank_p_value,
)
from ..quantization import dense_weight, writable_weight
from ..unit_map import UnitMap, random_units_with_counts
from ..units import ArchitectureSpec, UnitParts, UnitsDict, model_shapes, resolve_architecture, union_units, unit_slices

#: Units as ``{layer: {"mlp": [...], "attn": [...]}}`` (layer as int or str; kinds may be missing).
UnitSet = Mapping[Union[int, str], Mapping[str, Sequence[int]]]


def units_dict(units: Union[UnitSet, UnitMap], types: Optional[Sequence[str]] = None) -> UnitsDict:
    """Normalise ``units`` to ``{str(layer): {kind: sorted unique indices}}``.

    A :class:`~ssah_peft.UnitMap` needs ``types``: the union of those unit types is taken.
    """
    if isinstance(units, UnitMap):
        if not types:
            raise ValueError("Ablating a UnitMap needs the unit types to ablate, e.g. types=['SCU']")
        return union_units(*(units.units_of(unit_type) for unit_type in types))
    if types:
        raise ValueError("types only applies to a UnitMap; a units dict is ablated as given")
    return union_units(units)


def count_units(units: UnitSet) -> int:
    return sum(len(indices) for blocks in units.values() for indices in blocks.values())


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


class _LayerHolder:
    """What peft's ``QuantizationBackend.set_base_weight`` expects: something with ``get_base_layer()``."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def get_base_layer(self) -> nn.Module:
        return self.layer


def _zero_in_place(weight: torch.Tensor, slices: Sequence[tuple[str, torch.Tensor]]) -> None:
    for axis, index in slices:
        weight.index_fill_(1 if axis == "in" else 0, index.to(weight.device), 0.0)


@contextmanager
@torch.no_grad()
def _zeroed(module: nn.Module, slices: list[tuple[str, torch.Tensor]]) -> Iterator[None]:
    """Zero slices (``[out, in]`` convention) of one layer's weight (and the bias of zeroed rows), then restore."""
    backend = resolve_quantization_backend(module)
    bias = module.bias if isinstance(getattr(module, "bias", None), torch.Tensor) else None
    rows = [index for axis, index in slices if axis == "out"]
    saved_bias = None
    if bias is not None and rows:
        row_index = torch.cat(rows).unique().to(bias.device)
        saved_bias = (row_index, bias.data[row_index].clone())
        bias.data[row_index] = 0
    if backend is None:
        weight = writable_weight(module)  # the parameter data itself (a transposed view for Conv1D)
        saved = [
            (axis, index, weight.index_select(1 if axis == "in" else 0, index.to(weight.device)).clone())
            for axis, index in slices
        ]
        _zero_in_place(weight, slices)
    else:
        if backend.backend_name != "bnb 4bit":
            raise NotImplementedError(
                f"Ablation of {backend.backend_name} layers is not supported (only fp and bitsandbytes 4-bit weights)"
            )
        original_weight = module.weight
        had_state = "quant_state" in vars(module)
        original_state = vars(module).get("quant_state")
        weight = dense_weight(module).clone()
        _zero_in_place(weight, slices)
        backend.set_base_weight(_LayerHolder(module), weight.to(original_weight.quant_state.dtype))
    try:
        yield
    finally:
        if backend is None:
            weight = writable_weight(module)
            for axis, index, values in saved:
                weight.index_copy_(1 if axis == "in" else 0, index.to(weight.device), values)
        else:
            module.weight = original_weight
            if had_state:
                module.quant_state = original_state
        if saved_bias is not None:
            bias.data[saved_bias[0]] = saved_bias[1]


@contextmanager
def ablate(
    model: nn.Module,
    units: Union[UnitSet, UnitMap],
    *,
    types: Optional[Sequence[str]] = None,
    parts: UnitParts = "out_proj",
    spec: Optional[ArchitectureSpec] = None,
) -> Iterator[UnitsDict]:
    """Zero ``units`` of ``model`` inside the ``with`` block; the weights are restored on exit.

    Args:
        model: a transformers causal LM (fp or bitsandbytes 4-bit; a peft-wrapped model ablates its base layers).
        units: ``{layer: {"mlp": [...], "attn": [...]}}``, or a :class:`~ssah_peft.UnitMap` with ``types``.
        types: the unit types to ablate when ``units`` is a UnitMap.
        parts: ``"out_proj"`` zeroes the output-projection columns (the unit's write); ``"all"`` also zeroes the
            input-side rows (rule ``"any"``) and their biases.
        spec: the architecture; looked up from ``model.config`` by default.

    Yields:
        The ablated units as a normalised dict. For 4-bit layers the zeroed weight is requantized while active
        (the other weights of each touched quantization block move within quantization error); on exit the
        original quantized parameters are put back unchanged.
    """
    spec = spec or resolve_architecture(model.config)
    chosen = units_dict(units, types)
    shapes = model_shapes(model, spec)
    widths = shapes["widths"]
    unknown = sorted(layer for layer in chosen if not layer.isdigit() or int(layer) >= shapes["num_layers"])
    if unknown:
        raise ValueError(f"Units name layers the model does not have: {unknown}")
    per_module: dict[str, tuple[nn.Module, list[tuple[str, torch.Tensor]]]] = {}
    for kind, layer, name, _module in spec.output_projections(model):
        indices = chosen.get(str(layer), {}).get(kind, [])
        if not indices:
            continue
        width = widths[kind][layer]
        if max(indices) >= width or min(indices) < 0:
            raise ValueError(f"Unit indices of layer {layer} {kind} must lie in [0, {width}), got {indices}")
        prefix = name[: len(name) - len(spec.blocks[kind].out_proj)]
        for relative, (axis, index) in unit_slices(spec, kind, torch.tensor(indices), width, "any", parts).items():
            target = _base(model.get_submodule(prefix + relative))
            per_module.setdefault(prefix + relative, (target, []))[1].append((axis, index))
    with ExitStack() as stack:
        for module, slices in per_module.values():
            stack.enter_context(_zeroed(module, slices))
        yield chosen


def random_units_like(
    units: Union[UnitSet, UnitMap],
    model: nn.Module,
    seed: int = 0,
    *,
    types: Optional[Sequence[str]] = None,
    spec: Optional[ArchitectureSpec] = None,
) -> UnitsDict:
    """A random control for ``units``: as many units per layer and kind, drawn from the units NOT in the set.

    Drawing from the complement makes the comparison "these units vs. others of the same size and place"; a
    block where the set holds more than half of the units cannot be matched and raises ``ValueError``
    (:func:`ssah_peft.unit_map.random_units_with_counts` with the model's widths).
    """
    widths = model_shapes(model, spec or resolve_architecture(model.config))["widths"]
    return random_units_with_counts(units_dict(units, types), widths, seed, exclude_given=True)


# ----------------------------------------------------------------------------------------------------
# Against independent random draws, on continuous measures
# ----------------------------------------------------------------------------------------------------

#: The continuous measures (:func:`ssah_peft.experiments.curves.measure_point`) an ablation against random draws
#: compares, each with the side a unit type that carries safety should fall on: zeroing safety units lowers the
#: harmful refusal margin and selectivity more than random units do; the task loss is the utility reading.
DRAW_MEASURES: dict[str, str] = {"harmful_margin": "less", "selectivity": "less", "task_loss": "two-sided"}
#: The generation rates compared where they were measured: zeroing safety units raises the ASR; the over-refusal
#: may move either way.
GENERATION_MEASURES: dict[str, str] = {"asr": "greater", "overrefusal": "two-sided"}


def draw_name(unit_type: str, draw: int) -> str:
    """The name of the ``draw``-th random control of ``unit_type``: a set of its per-layer counts."""
    return f"random {unit_type} draw{draw}"


def draw_sets(unit_map: UnitMap, model: nn.Module, types: Sequence[str], draws: Sequence[int]) -> dict[str, UnitsDict]:
    """The unit sets of an ablation against random draws: each type of ``types``, then one random set of its
    per-layer counts per draw (:func:`random_units_like`, seeded by the draw, so draws are independent).

    One random control, as in :func:`ablation_table`, can only say "not like this one draw"; several draws give
    the spread that a type's effect must stand out from (:func:`draw_comparisons`).
    """
    if not types or not draws:
        raise ValueError("An ablation against random draws needs at least one unit type and one draw.")
    if len(set(draws)) != len(draws):
        raise ValueError(f"Draws must be distinct, got {list(draws)}")
    sets: dict[str, UnitsDict] = {}
    for unit_type in types:
        sets[unit_type] = units_dict(unit_map, [unit_type])
        for draw in draws:
            sets[draw_name(unit_type, draw)] = random_units_like(unit_map, model, draw, types=[unit_type])
    return sets


def draw_comparisons(
    points: Mapping[str, Mapping[str, float]],
    types: Sequence[str],
    draws: Sequence[int],
    measures: Mapping[str, str] = DRAW_MEASURES,
) -> list[dict[str, Any]]:
    """Each type's measured point against its random draws' points, one row per type and measure of ``measures``
    (name → the alternative: ``"less"``, ``"greater"`` or ``"two-sided"``).

    A row holds the type's value, the draws' mean and standard deviation, the prediction t-test
    (:func:`ssah_peft.evaluate.prediction_t_test`: assumes the draws normal) with its exact rank p-value beside,
    and the t-test's p-value Holm-adjusted over every row returned, the family the summary reports. Where the draws
    are all equal (a rate read on a few prompts) the t statistic is undefined (``t`` None) and the row's p-value is
    the exact rank p-value.
    """
    if len(draws) < 2:
        raise ValueError(f"Comparing with random draws needs at least two draws, got {len(draws)}")
    rows = []
    for unit_type in types:
        for measure, alternative in measures.items():
            values = np.array([points[draw_name(unit_type, draw)][measure] for draw in draws], dtype=np.float64)
            value = points[unit_type][measure]
            row = {
                "type": unit_type,
                "measure": measure,
                "alternative": alternative,
                "value": value,
                "draws_mean": float(values.mean()),
                "draws_sd": float(values.std(ddof=1)),
                "draws": len(values),
            }
            if row["draws_sd"] > 0:
                test = prediction_t_test(value, values, alternative=alternative)
                row.update(difference=test.difference, t=test.t, p=test.p_value, rank_p=test.rank_p_value)
            else:  # equal draws (a rate on a few prompts): no t statistic, the exact rank test alone is the test
                rank = rank_p_value(value, values, alternative)
                row.update(difference=value - row["draws_mean"], t=None, p=rank, rank_p=rank)
            rows.append(row)
    for row, adjusted in zip(rows, holm_adjust([row["p"] for row in rows])):
        row["holm_p"] = adjusted
    return rows


# ----------------------------------------------------------------------------------------------------
# Table 1
# ----------------------------------------------------------------------------------------------------


@dataclass
class AblationRow:
    """Metrics of the model with one unit set ablated (``"none"``: the intact model)."""

    name: str
    num_units: int
    share: float
    """Fraction of all units of the model."""
    asr: float
    overrefusal: float
    accuracy: float
    perplexity: float
    seconds: float
    counts: dict[str, list[int]] = field(default_factory=dict)
    """``[hits, n]`` behind ``asr``, ``overrefusal`` and ``accuracy``, for their Wilson intervals (absent in tables
    saved before they were recorded)."""

    def rate_cell(self, rate: str) -> str:
        """The rate ``rate`` with its 95% Wilson interval, or bare where its counts were not recorded."""
        return format_rate(*self.counts[rate]) if rate in self.counts else f"{getattr(self, rate):.3f}"


@dataclass
class AblationTable:
    """The paper's Table 1 shape: one row per ablated unit type (and a random control), plus the intact model."""

    rows: list[AblationRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [
            "| ablated | units | share | ASR | over-refusal | task acc. | PPL | s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.num_units} | {100 * r.share:.1f}% | {r.rate_cell('asr')} | "
                f"{r.rate_cell('overrefusal')} | {r.rate_cell('accuracy')} | {r.perplexity:.2f} | {r.seconds:.0f} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "settings": self.settings}

    def save(self, path: Union[str, Path]) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path]) -> AblationTable:
        data = read_json(path)
        return cls(rows=[AblationRow(**r) for r in data["rows"]], settings=data.get("settings", {}))


def _measure(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings, limit: int
) -> dict[str, Any]:
    from ..data import load_builtin

    safety, _ = evaluate_safety(model, tokenizer, settings=settings, limit=limit)
    utility, _ = evaluate_utility(
        model,
        tokenizer,
        settings=settings,
        limit=limit,
        perplexity_sets={"utility_calibration": load_builtin("utility_calibration")},
    )
    harmful, benign, task = safety["harmful"], safety["overrefusal"], utility["task"]
    return {
        "asr": harmful["asr"],
        "overrefusal": benign["rate"],
        "accuracy": task["accuracy"],
        "perplexity": utility["perplexity"]["utility_calibration"]["ppl"],
        "counts": {
            "asr": [harmful["attack_successes"], harmful["n"]],
            "overrefusal": [benign["refusals"], benign["n"]],
            "accuracy": [task["correct"], task["n"]],
        },
    }


def ablation_table(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    unit_map: UnitMap,
    types: Sequence[str] = ("SCU", "UCU", "RU", "CU"),
    random_control: bool = True,
    *,
    parts: UnitParts = "out_proj",
    limit: int = 20,
    settings: Optional[GenerationSettings] = None,
    seed: int = 0,
    allow_other_weights: bool = False,
) -> AblationTable:
    """Ablate each unit type of ``unit_map`` in turn and measure ASR, over-refusal, task accuracy and perplexity.

    The first row is the intact model; with ``random_control`` the last row ablates random units of the same
    size per layer and kind as ``types[0]`` (SCU by default), the control the SCU row must beat. Every set is
    evaluated on the first ``limit`` records of the built-in sets (keyword judges; perplexity of the
    ``utility_calibration`` responses), greedy with ``settings`` (default: 32 new tokens, batches of 16).
    ``allow_other_weights``: ablate the units of a map scored on other weights of the same shapes, on purpose.
    """
    unit_map.check_model(model, allow_other_weights=allow_other_weights)
    settings = settings or GenerationSettings(max_new_tokens=32, show_progress=False)
    total = sum(sum(w) for w in unit_map.fingerprint["widths"].values())
    sets: list[tuple[str, UnitsDict]] = [("none", {})]
    sets += [(unit_type, units_dict(unit_map, [unit_type])) for unit_type in types]
    if random_control and types:
        sets.append((f"random ({types[0]}-sized)", random_units_like(unit_map, model, seed, types=[types[0]])))
    rows = []
    for name, units in sets:
        start = time.perf_counter()
        with ablate(model, units, parts=parts):
            metrics = _measure(model, tokenizer, settings, limit)
        count = count_units(units)
        rows.append(
            AblationRow(
                name=name,
                num_units=count,
                share=count / total,
                **metrics,
                seconds=round(time.perf_counter() - start, 2),
            )
        )
    return AblationTable(
        rows=rows,
        settings={
            "parts": parts,
            "limit": limit,
            "max_new_tokens": settings.max_new_tokens,
            "seed": seed,
            "unit_map_settings": unit_map.settings,
        },
    )
