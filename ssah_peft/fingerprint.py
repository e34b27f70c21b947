"""What identifies the model a unit map or an adapter was made for: its shapes, and a sample of its weights.

A unit index names a channel of one particular model, so a unit map (and an adapter trained on one) must be used
on that model only. Shapes tell models of other widths apart, not another checkpoint of the same architecture
(another seed, v1 and v2, a base model and its instruct sibling), whose unit 17 is another unit. So a fingerprint
(:func:`model_fingerprint`) also holds a **weight sample**: 64 consecutive values (one aligned bitsandbytes 4-bit
quantization block) from the middle of the output projection of each block kind in the first and the last layer,
at most 256 numbers, read at positions fixed by the shapes alone. Reading them costs the same at 7B as on a tiny
model: no pass over the weights, and of a quantized weight only the sampled block is dequantized.

The same model may be loaded in float32, bfloat16, float16, 8-bit or 4-bit (QLoRA trains on the 4-bit base and
serves on bf16), so two samples are compared element by element with the precision of both sides
(:func:`weight_sample_difference`), and the weights are the same when at least :data:`SAME_WEIGHTS_AGREEMENT`
(97%) of the sampled values agree:

* float against float (and against 8-bit, LLM.int8 with a scale per row): within 2⁻⁸ relative (twice the rounding
  of bfloat16, the coarsest float format here) plus half of each side's quantization step. A checkpoint and its
  copy in another dtype always agree; a fine-tune that moved the weights by 1% (relative RMS) agrees on ~24%;
* against a 4-bit side: the 4-bit code each value of the other side quantizes to (value / block absmax, nearest
  codebook entry, as bitsandbytes quantizes), where a value within its own precision of a code boundary may take
  either code. The 4-bit side must hold one whole quantization block, which the sampled block is for bitsandbytes'
  default blocksize 64; otherwise the values are compared within both quantization steps.

Measured on Gaussian blocks (200 × 256 values; ``tests/test_weight_binding.py`` checks the same on a tiny Llama,
where 8-bit against 4-bit agrees on 100% too): the same weights agree on 100% from float32 or bfloat16 against
4-bit (≥ 98% when both sides are 4-bit, quantized from different float dtypes), another seed on 3-13%, a sibling
whose weights moved by 5% on 81-93% through a 4-bit load and on 2-8% in float. A sibling closer than the 4-bit
quantization step cannot be told from the same weights through a 4-bit load (one that moved by 2% passes 15% of
the time, by 1% most of the time): that is the limit of this check; float loads tell apart even a 1% move.

A sample that could not be read (weights offloaded to the meta device or sharded by FSDP, or a quantization other
than bitsandbytes) and fingerprints written before samples existed count as unknown: the shapes are checked, the
weights are not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils import resolve_quantization_backend
from torch import nn

from .quantization import disable_cpu_4bit_repacking, writable_weight
from .units import ArchitectureSpec, _text_config, model_shapes, resolve_architecture

SAMPLE_LENGTH = 64
"""Values sampled per weight: one block of bitsandbytes' default 4-bit blocksize, so 4-bit codes can be compared."""
SAME_WEIGHTS_AGREEMENT = 0.97
"""Fraction of sampled values that must agree for two samples to be of the same weights (module docstring)."""
FLOAT_TOLERANCE = 2.0**-8
"""Relative difference two float loads of the same weights stay within: twice bfloat16's rounding (2⁻⁹)."""
SAMPLE_VERSION = 1

OVERRIDE_ADVICE = (
    "To use it on purpose (e.g. a base model's unit map on its instruct sibling), pass allow_other_weights=True "
    "(`ssah-peft finetune --allow-other-weights`)."
)


def model_fingerprint(model: nn.Module, spec: Optional[ArchitectureSpec] = None) -> dict[str, Any]:
    """What a unit index means in ``model``: model type, layer count, hidden sizes, block widths and a sample of the
    weights (``"weight_sample"``, :func:`weight_sample`; left out where it cannot be read)."""
    spec = spec if spec is not None else resolve_architecture(model.config)
    fingerprint = {"model_type": getattr(_text_config(model.config), "model_type", None), **model_shapes(model, spec)}
    sample = weight_sample(model, spec)
    if sample is not None:
        fingerprint["weight_sample"] = sample
    return fingerprint


def shape_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint without its weight sample: what maps of one architecture share across checkpoints."""
    return {key: value for key, value in fingerprint.items() if key != "weight_sample"}


def check_model_fingerprint(
    fingerprint: Mapping[str, Any],
    model: nn.Module,
    architecture: Optional[ArchitectureSpec] = None,
    *,
    allow_other_weights: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``model`` is the model a unit map with ``fingerprint`` was computed for.

    The check behind :meth:`ssah_peft.UnitMap.check_model`, also run by the SSAH tuner when a config built from a map
    (:attr:`ssah_peft.SSAHConfig.unit_map_fingerprint`) meets a model. Other shapes are always refused; other
    weights unless ``allow_other_weights``. ``architecture``: where the units are, when not the table's entry for
    the model type.
    """
    check_fingerprint(fingerprint, model_fingerprint(model, architecture), allow_other_weights=allow_other_weights)


def check_fingerprint(
    fingerprint: Mapping[str, Any], found: Mapping[str, Any], *, allow_other_weights: bool = False
) -> None:
    """:func:`check_model_fingerprint` against the model's fingerprint ``found``, for callers that have it."""
    if shape_fingerprint(found) != shape_fingerprint(fingerprint):
        raise ValueError(
            f"This unit map was computed for a model with {describe_fingerprint(fingerprint)}, but the model has "
            f"{describe_fingerprint(found)}; its unit indices would point at the wrong units. Score this model "
            "instead (`ssah-peft score`, or ssah_peft.score_units and UnitMap.from_scores) and use that map."
        )
    if allow_other_weights:
        return
    difference = weight_sample_difference(fingerprint.get("weight_sample"), found.get("weight_sample"))
    if difference is not None:
        raise ValueError(
            f"This unit map was computed on other weights than this model's, though the shapes match: {difference}. "
            "It was made on another checkpoint (another seed or version, or a base / fine-tuned sibling of this "
            "model), whose units are not this model's. Score this model instead (`ssah-peft score`, or "
            f"ssah_peft.score_units and UnitMap.from_scores). {OVERRIDE_ADVICE}"
        )


def describe_fingerprint(fingerprint: Mapping[str, Any]) -> str:
    return (
        f"model_type={fingerprint.get('model_type')!r}, {fingerprint.get('num_layers')} layers, hidden sizes "
        f"{fingerprint.get('hidden_sizes')}, block widths {fingerprint.get('widths')}"
    )


# ----------------------------------------------------------------------------------------------------
# The weight sample
# ----------------------------------------------------------------------------------------------------


def weight_sample(model: nn.Module, spec: ArchitectureSpec) -> Optional[dict[str, Any]]:
    """``{"version", "weights": [{"layer", "kind", "start", "format", "values", ...}]}``: the sampled values of the
    output projections of the first and the last layer (module docstring), or ``None`` where one cannot be read.

    Values are in the ``torch.nn.Linear`` convention (``[out, in]``, row-major; ``start`` is the flat index of the
    first). ``format`` is ``"float"``, ``"int8"`` (with ``step``, the quantization step of the sampled rows) or
    ``"4bit"`` (with ``blocksize`` and ``codebook``).
    """
    projections = list(spec.output_projections(model))
    first, last = 0, max(layer for _, layer, _, _ in projections)
    weights = []
    for kind, layer, _, module in projections:
        if layer not in (first, last):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        read = _read_sample(base)
        if read is None:
            return None
        weights.append({"layer": layer, "kind": kind, **read})
    return {"version": SAMPLE_VERSION, "weights": sorted(weights, key=lambda w: (w["layer"], w["kind"]))}


def _read_sample(base: nn.Module) -> Optional[dict[str, Any]]:
    """The sampled block of one weight, read without materialising the rest of it."""
    in_features, out_features = (int(n) for n in _get_in_out_features(base))
    numel = in_features * out_features
    length = min(SAMPLE_LENGTH, numel)
    start = (numel // SAMPLE_LENGTH) // 2 * SAMPLE_LENGTH if numel >= SAMPLE_LENGTH else 0
    positions = torch.arange(start, start + length)
    if _is_bnb(base, "Linear4bit"):
        if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
            disable_cpu_4bit_repacking(base)  # the CPU kernel's layout: back to the standard one first
        return {"start": start, **_read_4bit(base.weight, positions)}
    if _is_bnb(base, "Linear8bitLt") and getattr(base.weight, "SCB", None) is not None:
        rows = positions // in_features
        scale = base.weight.SCB.detach()[rows.to(base.weight.device)].float().cpu() / 127
        values = base.weight.detach()[rows, positions % in_features].float().cpu() * scale
        return {"start": start, "format": "int8", "step": float(scale.max()), "values": _numbers_of(values)}
    if resolve_quantization_backend(base) is not None:
        return None  # another quantization: no sampled read of it
    weight = writable_weight(base)
    if weight.is_meta or _sharded(weight):
        return None  # offloaded, or a shard (FSDP2): reading the sampled values would take a collective
    index = positions.to(weight.device)
    values = weight[index // in_features, index % in_features].float().cpu()
    return {"start": start, "format": "float", "values": _numbers_of(values)}


def _numbers_of(values: torch.Tensor) -> list[float]:
    """float32 values as decimals of 9 significant digits: they give the float32 values back, in half the JSON."""
    return [float(f"{value:.9g}") for value in values.float().tolist()]


def _sharded(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _is_bnb(module: nn.Module, name: str) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, getattr(bnb.nn, name))


def _read_4bit(weight: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
    """Dequantize the 4-bit values at ``positions`` only: two codes per stored byte (the first in the high nibble),
    times the absmax of their block (itself 8-bit quantized per 256 blocks when double quantization is on)."""
    state = weight.quant_state
    packed = weight.data.reshape(-1)
    positions = positions.to(packed.device)
    byte = packed[positions // 2].int()
    codes = torch.where(positions % 2 == 0, byte >> 4, byte & 15)
    blocks = positions // state.blocksize
    if state.nested:
        nested = state.state2
        absmax = nested.code[state.absmax[blocks].int()] * nested.absmax[blocks // nested.blocksize] + state.offset
    else:
        absmax = state.absmax[blocks]
    values = (state.code[codes].float() * absmax.float()).cpu()
    return {
        "format": "4bit",
        "blocksize": int(state.blocksize),
        "codebook": _numbers_of(state.code),
        "values": _numbers_of(values),
    }


def weight_sample_agreement(recorded: Any, found: Any) -> Optional[float]:
    """The fraction of sampled values on which two weight samples agree (module docstring), or ``None`` when they
    cannot be compared (one is missing, from another sampling rule, or of other weights or positions)."""
    agreements = _agreements(recorded, found)
    return None if agreements is None else _fraction(agreements.values())


def weight_sample_difference(recorded: Any, found: Any) -> Optional[str]:
    """How two weight samples show other weights (fewer than :data:`SAME_WEIGHTS_AGREEMENT` of the values agree), or
    ``None`` when they agree or cannot be compared."""
    agreements = _agreements(recorded, found)
    if agreements is None or _fraction(agreements.values()) >= SAME_WEIGHTS_AGREEMENT:
        return None
    per_weight = ", ".join(
        f"layer {layer} {kind} {_fraction([agree]):.0%}" for (layer, kind), agree in agreements.items()
    )
    total = sum(agree.numel() for agree in agreements.values())
    return (
        f"{_fraction(agreements.values()):.0%} of {total} sampled weight values agree ({per_weight}), where the same "
        f"weights loaded in float32, bfloat16, 8-bit or 4-bit agree on at least {SAME_WEIGHTS_AGREEMENT:.0%}"
    )


def _fraction(agreements: Iterable[torch.Tensor]) -> float:
    return torch.cat(list(agreements)).double().mean().item()


def _agreements(recorded: Any, found: Any) -> Optional[dict[tuple[Any, Any], torch.Tensor]]:
    """``(layer, kind) → per sampled value, whether the two samples agree there``, or ``None`` (not comparable)."""
    pairs = _paired(recorded, found)
    if pairs is None:
        return None
    return {(mine["layer"], mine["kind"]): _agreement(mine, theirs) for mine, theirs in pairs}


def _paired(recorded: Any, found: Any) -> Optional[list[tuple[Mapping[str, Any], Mapping[str, Any]]]]:
    """The entries of two samples matched by weight (layer and block kind), or ``None`` unless both are well-formed
    samples of this version holding the same weights at the same positions."""
    entries = []
    for sample in (recorded, found):
        if not (isinstance(sample, Mapping) and sample.get("version") == SAMPLE_VERSION):
            return None
        weights = sample.get("weights")
        if not (isinstance(weights, list) and weights and all(_well_formed(entry) for entry in weights)):
            return None
        entries.append({(entry["layer"], entry["kind"]): entry for entry in weights})
    mine, theirs = entries
    if mine.keys() != theirs.keys():
        return None
    pairs = [(mine[key], theirs[key]) for key in mine]
    if any(a["start"] != b["start"] or len(a["values"]) != len(b["values"]) for a, b in pairs):
        return None
    return pairs


def _well_formed(entry: Any) -> bool:
    return (
        isinstance(entry, Mapping)
        and all(k in entry for k in ("layer", "kind", "start"))
        and _numbers(entry.get("values"))
        and (entry.get("codebook") is None or _numbers(entry["codebook"]))
    )


def _numbers(values: Any) -> bool:
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    )


def _agreement(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> torch.Tensor:
    """Per sampled value, whether the two sides can hold the same weight (module docstring)."""
    for four_bit, other in ((mine, theirs), (theirs, mine)):
        if _whole_4bit_block(four_bit, len(mine["values"])):
            return _same_codes(four_bit, other)
    a = torch.tensor(mine["values"], dtype=torch.float64)
    b = torch.tensor(theirs["values"], dtype=torch.float64)
    bound = (_step(mine) + _step(theirs)) / 2 + FLOAT_TOLERANCE * torch.maximum(a.abs(), b.abs())
    return (a - b).abs() <= bound


def _same_codes(four_bit: Mapping[str, Any], other: Mapping[str, Any]) -> torch.Tensor:
    """Whether each value of ``other``, within its own precision, quantizes to the code ``four_bit`` stores.

    Values are scaled by their block's absmax, as bitsandbytes quantizes. A value of ``other`` stands for an
    interval (half its quantization step, plus float rounding of it and of the absmax), which covers a range of
    codes where it lies next to a code boundary: the same weights rounded differently still agree.
    """
    codebook = torch.tensor(four_bit["codebook"], dtype=torch.float64)
    stored = _quantized(_normalized(torch.tensor(four_bit["values"], dtype=torch.float64)), codebook)
    values = torch.tensor(other["values"], dtype=torch.float64)
    scale = values.abs().max()
    if scale == 0:
        return stored == _quantized(values, codebook)
    spread = 0.0 if _whole_4bit_block(other, values.numel()) else _step(other) / 2
    radius = (spread + 2 * FLOAT_TOLERANCE * values.abs()) / scale
    low, high = _quantized(values / scale - radius, codebook), _quantized(values / scale + radius, codebook)
    return (low <= stored) & (stored <= high)


def _normalized(values: torch.Tensor) -> torch.Tensor:
    scale = values.abs().max()
    return values / scale if scale > 0 else values


def _quantized(normalized: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The codebook value nearest to each normalized value (rounding is monotone: an interval maps to a range)."""
    return codebook[(normalized[:, None] - codebook[None, :]).abs().argmin(dim=1)]


def _whole_4bit_block(side: Mapping[str, Any], length: int) -> bool:
    """Whether ``side`` is a 4-bit sample of exactly one quantization block (whose codes the other side can redo)."""
    codebook = side.get("codebook")
    return (
        side.get("format") == "4bit"
        and side.get("blocksize") == length
        and side.get("start", -1) % length == 0
        and isinstance(codebook, list)
        and len(codebook) == 16
    )


def _step(side: Mapping[str, Any]) -> float:
    """The quantization step of a sample (0 for floats); for 4-bit, the widest codebook gap times the absmax."""
    step = side.get("step")
    if side.get("format") == "int8" and isinstance(step, (int, float)) and not isinstance(step, bool):
        return float(step)
    if side.get("format") == "4bit" and isinstance(side.get("codebook"), list):
        codebook = sorted(side["codebook"])
        gap = max(b - a for a, b in zip(codebook, codebook[1:]))
        return gap * max(abs(v) for v in side["values"])
    return 0.0
