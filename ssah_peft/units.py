"""Units and the weight slices they own, per model architecture.

A *unit* (Li & Kim, arXiv 2410.10862, Sec. 3) is an input channel of a block's output projection B in
f(X) = B·σ(A·X): an MLP neuron (input channel of ``down_proj``) or an attention channel (input channel of
``o_proj``). Unit j owns column j of B and, on the input side, the rows of A that produce channel j. Real
models lay those rows out differently (separate or fused projections, grouped-query attention, GPT-2's
transposed ``Conv1D``), so a small explicit table maps each model family to the slices of its weights.

Everything here speaks the ``torch.nn.Linear`` convention: a weight is ``[out_features, in_features]``;
axis ``"out"`` means rows, axis ``"in"`` means columns. Tuner layers translate for ``Conv1D``.

Some input-side rows are shared by several units: a query head's rows feed all ``head_dim`` channels of
that head, and under GQA a key/value head feeds several query heads. Such a row belongs to a *set* of
units only under a rule: ``"any"`` (at least one sharing unit is in the set; what protection needs,
so nothing a protected unit reads from can change) or ``"all"`` (every sharing unit is in the set; what
selection needs, so nothing outside the selection is trained).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

BlockKind = Literal["mlp", "attn"]
BLOCK_KINDS: tuple[str, ...] = ("mlp", "attn")
Axis = Literal["in", "out"]
ShareRule = Literal["any", "all"]
UnitParts = Literal["out_proj", "all"]

#: One tensor per unit of every block: ``per_block[kind][layer][unit]`` (scores, unit types, statistics).
PerBlock = dict[str, tuple[torch.Tensor, ...]]
#: Unit sets in normal form, as ``adapter_config.json`` stores them: ``{"<layer>": {"mlp": [...], "attn": [...]}}``
#: with sorted, unique indices (:func:`union_units`).
UnitsDict = dict[str, dict[str, list[int]]]

#: How the rows of an input-side part map to units (see module docstring).
#: ``channel``: row i belongs to unit i. ``head``: rows of query head h belong to its head_dim channels.
#: ``kv_head``: rows of key/value head g belong to all channels of the query heads that read it.
#: ``kv_channel``: row g*head_dim + d belongs to channel d of every query head reading kv head g.
SHARINGS: tuple[str, ...] = ("channel", "head", "kv_head", "kv_channel")


@dataclass(frozen=True)
class ProjectionPart:
    """Rows of an input-side projection that produce a block's units."""

    module: str
    """Path of the projection relative to a decoder layer, e.g. ``"self_attn.v_proj"``."""
    offset: int = 0
    """Index of the part's first row inside the weight (non-zero in fused weights such as ``qkv_proj``)."""
    sharing: str = "channel"
    """One of :data:`SHARINGS`."""


@dataclass(frozen=True)
class BlockSpec:
    """One depth-2 block f(X) = B·σ(A·X) of a decoder layer."""

    out_proj: str
    """Path of B relative to a decoder layer; unit j is its input channel j (column j)."""
    in_parts: tuple[ProjectionPart, ...] = ()
    """Rows of A (and of the gate, value, query, key projections) that produce the units."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where a model family keeps its units. Serialisable to JSON through :meth:`to_dict`."""

    layers: str
    """Name of the decoder-layer ``ModuleList`` attribute (``"layers"`` for Llama, ``"h"`` for GPT-2)."""
    blocks: Mapping[str, BlockSpec]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    conv1d: bool = False
    """True when the projections are ``transformers.Conv1D`` (weights stored ``[in, out]``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for kind, block in self.blocks.items():
            if kind not in BLOCK_KINDS:
                raise ValueError(f"Unknown block kind {kind!r}; expected one of {BLOCK_KINDS}")
            for part in block.in_parts:
                if part.sharing not in SHARINGS:
                    raise ValueError(f"Unknown sharing {part.sharing!r} in {part}; expected one of {SHARINGS}")
                if part.module == block.out_proj:
                    raise ValueError(f"{part.module!r} cannot be both the output projection and an input part")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchitectureSpec:
        data = dict(data)
        blocks = {
            kind: BlockSpec(
                out_proj=b["out_proj"],
                in_parts=tuple(ProjectionPart(**p) for p in b.get("in_parts", ())),
            )
            for kind, b in data.pop("blocks").items()
        }
        return cls(blocks=blocks, **data)

    def layer_pattern(self, relative_module: str) -> re.Pattern[str]:
        """Regex matching the full name of ``relative_module`` in any decoder layer; group 1 is the layer."""
        return re.compile(rf"(?:^|.*\.){re.escape(self.layers)}\.(\d+)\.{re.escape(relative_module)}$")

    def output_projections(self, model: Any) -> Iterator[tuple[str, int, str, Any]]:
        """``(kind, layer, full name, module)`` of every block's output projection in ``model``, kind by kind.

        One walk over the model's modules for all kinds: a scoring pass looks them up twice, and each walk of a
        large model costs the host more than a batch's statistics cost the GPU."""
        found: dict[str, list[tuple[str, int, str, Any]]] = {kind: [] for kind in self.blocks}
        patterns = {kind: (block.out_proj, self.layer_pattern(block.out_proj)) for kind, block in self.blocks.items()}
        for name, module in model.named_modules():
            for kind, (suffix, pattern) in patterns.items():
                match = pattern.fullmatch(name) if name.endswith(suffix) else None
                if match is not None:
                    found[kind].append((kind, int(match.group(1)), name, module))
        for projections in found.values():
            yield from projections

    def modules(self, kind: str) -> tuple[str, ...]:
        block = self.blocks[kind]
        return (block.out_proj, *dict.fromkeys(p.module for p in block.in_parts))


# ----------------------------------------------------------------------------------------------------
# The architecture table
# ----------------------------------------------------------------------------------------------------


def _text_config(config: Any) -> Any:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _attention_geometry(config: Any) -> dict[str, int]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}


def _llama_like(config: Any) -> ArchitectureSpec:
    """Separate q/k/v/o and gate/up/down projections (Llama, Mistral, Qwen2/3, Gemma 1-3)."""
    return ArchitectureSpec(
        layers="layers",
        blocks={
            "mlp": BlockSpec(
                out_proj="mlp.down_proj",
                in_parts=(ProjectionPart("mlp.gate_proj"), ProjectionPart("mlp.up_proj")),
            ),
            "attn": BlockSpec(
                out_proj="self_attn.o_proj",
                in_parts=(
                    ProjectionPart("self_attn.q_proj", sharing="head"),
                    ProjectionPart("self_attn.k_proj", sharing="kv_head"),
                    ProjectionPart("self_attn.v_proj", sharing="kv_channel"),
                ),
            ),
        },
        **_attention_geometry(config),
    )


def _phi3(config: Any) -> ArchitectureSpec:
    """Fused ``qkv_proj`` (q, k, v rows in that order) and ``gate_up_proj`` (gate rows, then up rows)."""
    geo = _attention_geometry(config)
    q_rows = geo["num_heads"] * geo["head_dim"]
    kv_rows = geo["num_kv_heads"] * geo["head_dim"]
    return ArchitectureSpec(
        layers="layers",
        blocks={
            "mlp": BlockSpec(
                out_proj="mlp.down_proj",
                in_parts=(
                    ProjectionPart("mlp.gate_up_proj", 0),
                    ProjectionPart("mlp.gate_up_proj", int(config.intermediate_size)),
                ),
            ),
            "attn": BlockSpec(
                out_proj="self_attn.o_proj",
                in_parts=(
                    ProjectionPart("self_attn.qkv_proj", 0, "head"),
                    ProjectionPart("self_attn.qkv_proj", q_rows, "kv_head"),
                    ProjectionPart("self_attn.qkv_proj", q_rows + kv_rows, "kv_channel"),
                ),
            ),
        },
        **geo,
    )


def _gpt2(config: Any) -> ArchitectureSpec:
    """``Conv1D`` layers; ``c_attn`` fuses q, k, v; ``mlp.c_fc`` → activation → ``mlp.c_proj``."""
    geo = _attention_geometry(config)
    hidden = geo["num_heads"] * geo["head_dim"]
    return ArchitectureSpec(
        layers="h",
        blocks={
            "mlp": BlockSpec(out_proj="mlp.c_proj", in_parts=(ProjectionPart("mlp.c_fc"),)),
            "attn": BlockSpec(
                out_proj="attn.c_proj",
                in_parts=(
                    ProjectionPart("attn.c_attn", 0, "head"),
                    ProjectionPart("attn.c_attn", hidden, "kv_head"),
                    ProjectionPart("attn.c_attn", 2 * hidden, "kv_channel"),
                ),
            ),
        },
        conv1d=True,
        **geo,
    )


#: model_type → function of the (text) config returning the spec. Add a family here, or pass
#: ``SSAHConfig(architecture=ArchitectureSpec(...).to_dict())`` for a model that is not listed.
ARCHITECTURES: dict[str, Callable[[Any], ArchitectureSpec]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "qwen3": _llama_like,
    "gemma": _llama_like,
    "gemma2": _llama_like,
    "gemma3_text": _llama_like,
    "phi3": _phi3,
    "gpt2": _gpt2,
}


def resolve_architecture(config: Any) -> ArchitectureSpec:
    """Look up the spec of a transformers config (or its text sub-config) in :data:`ARCHITECTURES`."""
    text_config = _text_config(config)
    model_type = getattr(text_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(
            f"ssah-peft has no architecture entry for model_type={model_type!r}. Known: {sorted(ARCHITECTURES)}. "
            "Add one to ssah_peft.units.ARCHITECTURES (a function of the config returning an ArchitectureSpec that "
            "names the decoder-layer list, each block's output projection and the input-side rows of its units), "
            "or pass SSAHConfig(architecture=ArchitectureSpec(...).to_dict())."
        )
    return ARCHITECTURES[model_type](text_config)


def model_shapes(model: nn.Module, spec: ArchitectureSpec) -> dict[str, Any]:
    """Layer count, hidden size and per-layer block widths, read from the output projections."""
    widths: dict[str, dict[int, int]] = {}
    hidden: set[int] = set()
    for kind, layer, _, module in spec.output_projections(model):
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        in_features, out_features = _get_in_out_features(base)
        widths.setdefault(kind, {})[layer] = int(in_features)
        hidden.add(int(out_features))
    found = {kind: sorted(widths.get(kind, {})) for kind in spec.blocks}
    num_layers = len(next(iter(found.values())))
    if num_layers == 0 or any(layers != list(range(num_layers)) for layers in found.values()):
        raise ValueError(
            f"The architecture spec (layers={spec.layers!r}, output projections "
            f"{ {k: b.out_proj for k, b in spec.blocks.items()} }) does not match this model's modules "
            f"(layers found per block: {found}). Pass SSAHConfig(architecture=...) describing this model."
        )
    return {
        "num_layers": num_layers,
        "hidden_sizes": sorted(hidden),
        "widths": {kind: [w[i] for i in range(num_layers)] for kind, w in widths.items()},
    }


# ----------------------------------------------------------------------------------------------------
# From units to slices
# ----------------------------------------------------------------------------------------------------


def _part_rows(spec: ArchitectureSpec, part: ProjectionPart, width: int) -> int:
    if part.sharing == "channel":
        return width
    heads = spec.num_heads if part.sharing == "head" else spec.num_kv_heads
    return heads * spec.head_dim


def _unit_keys(spec: ArchitectureSpec, sharing: str, units: torch.Tensor) -> torch.Tensor:
    """The key of the row group each unit reads from; rows carry the same keys (see :func:`_row_keys`)."""
    if sharing == "channel":
        return units
    head, dim = units // spec.head_dim, units % spec.head_dim
    kv_head = head // (spec.num_heads // spec.num_kv_heads)
    return {"head": head, "kv_head": kv_head, "kv_channel": kv_head * spec.head_dim + dim}[sharing]


def _row_keys(spec: ArchitectureSpec, sharing: str, rows: int) -> torch.Tensor:
    index = torch.arange(rows)
    return index if sharing in ("channel", "kv_channel") else index // spec.head_dim


def unit_slices(
    spec: ArchitectureSpec,
    kind: str,
    units: torch.Tensor,
    width: int,
    rule: ShareRule,
    parts: UnitParts = "all",
) -> dict[str, tuple[Axis, torch.Tensor]]:
    """Map a set of units of one block to the weight slices they own.

    Args:
        spec: the architecture.
        kind: ``"mlp"`` or ``"attn"``.
        units: 1-D integer tensor of unit indices (input channels of the output projection).
        width: number of units in the block (``in_features`` of the output projection).
        rule: ``"any"`` or ``"all"``, for rows shared by several units (module docstring).
        parts: ``"out_proj"`` for the output-projection columns only, ``"all"`` for every slice.

    Returns:
        ``{relative module path: (axis, sorted unique int64 indices)}``; modules with no slice are omitted.
    """
    block = spec.blocks[kind]
    units = torch.as_tensor(units, dtype=torch.long).unique()
    result: dict[str, tuple[Axis, torch.Tensor]] = {}
    if units.numel():
        result[block.out_proj] = ("in", units)
    if parts == "out_proj" or not units.numel():
        return result
    every_unit = torch.arange(width)
    rows_by_module: dict[str, list[torch.Tensor]] = {}
    for part in block.in_parts:
        keys_all = _unit_keys(spec, part.sharing, every_unit)
        total = torch.bincount(keys_all)
        chosen = torch.bincount(_unit_keys(spec, part.sharing, units), minlength=total.numel())
        key_in_set = chosen > 0 if rule == "any" else chosen == total
        row_keys = _row_keys(spec, part.sharing, _part_rows(spec, part, width))
        rows = torch.nonzero(key_in_set[row_keys]).flatten() + part.offset
        rows_by_module.setdefault(part.module, []).append(rows)
    for module, rows in rows_by_module.items():
        merged = torch.cat(rows).unique()
        if merged.numel():
            result[module] = ("out", merged)
    return result


# ----------------------------------------------------------------------------------------------------
# Unit sets
# ----------------------------------------------------------------------------------------------------


def union_units(*unit_sets: Mapping[Any, Mapping[str, Iterable[int]]]) -> UnitsDict:
    """The union of unit sets ``{layer: {kind: indices}}``, in normal form: ``{str(layer): {kind: sorted unique
    indices}}``.

    Layer keys may be ints or strings of ints; indices any iterable of integers (a list, a tensor). Every layer and
    kind named by any set is kept, also with no index, in the order first named. With one set this normalises it.
    """
    merged: dict[str, dict[str, set[int]]] = {}
    for unit_set in unit_sets:
        for layer, blocks in unit_set.items():
            per_layer = merged.setdefault(str(int(layer)), {})
            for kind, indices in blocks.items():
                per_layer.setdefault(kind, set()).update(int(i) for i in indices)
    return {layer: {kind: sorted(indices) for kind, indices in blocks.items()} for layer, blocks in merged.items()}
