"""`SSAHConfig`: which units an adapter trains (select) or protects (protect), as a peft config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from peft.config import PeftConfig

from ..units import BLOCK_KINDS

#: Normalised unit sets as stored in ``adapter_config.json``: ``{"<layer>": {"mlp": [...], "attn": [...]}}``.
UnitsDict = dict[str, dict[str, list[int]]]

DELTA_DTYPES = ("float32", "bfloat16", "float16")


def normalize_units(units: Any) -> UnitsDict:
    """Validate a unit mapping and bring it into the JSON form the config stores.

    Accepts ``{layer: {"mlp": indices, "attn": indices}}`` with int or str layer keys and indices given
    as any integer sequence, tensor or array. Indices are sorted; negatives, duplicates, non-integers and
    unknown block kinds are errors (a silent fix would hide a wrong unit map).
    """
    if not isinstance(units, Mapping):
        raise TypeError(f"units must be a mapping {{layer: {{'mlp': indices, 'attn': indices}}}}, got {type(units)}")
    normalized: UnitsDict = {}
    for layer, blocks in units.items():
        try:
            layer_index = int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"units: layer key {layer!r} is not an integer") from None
        if layer_index < 0:
            raise ValueError(f"units: negative layer index {layer_index}")
        if not isinstance(blocks, Mapping):
            raise TypeError(f"units[{layer!r}] must map block kinds to indices, got {type(blocks)}")
        per_layer: dict[str, list[int]] = {}
        for kind, indices in blocks.items():
            if kind not in BLOCK_KINDS:
                raise ValueError(f"units[{layer!r}]: unknown block kind {kind!r}; expected one of {BLOCK_KINDS}")
            tensor = torch.as_tensor(indices).flatten()
            if tensor.numel() == 0:
                tensor = tensor.long()  # an empty list is read as float
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise TypeError(f"units[{layer!r}][{kind!r}] must hold integer indices, got {tensor.dtype}")
            values = sorted(int(i) for i in tensor.tolist())
            if values and values[0] < 0:
                raise ValueError(f"units[{layer!r}][{kind!r}] has a negative index {values[0]}")
            duplicates = sorted({a for a, b in zip(values, values[1:]) if a == b})
            if duplicates:
                raise ValueError(f"units[{layer!r}][{kind!r}] has duplicate indices {duplicates[:10]}")
            per_layer[kind] = values
        key = str(layer_index)
        if key in normalized:
            raise ValueError(f"units: layer {layer_index} is given twice")
        normalized[key] = per_layer
    return normalized


@dataclass
class SSAHConfig(PeftConfig):
    """Configuration of an SSAH adapter (Li & Kim, "Superficial Safety Alignment Hypothesis").

    The adapter acts on the units of the targeted blocks: a unit is an input channel of a block's output
    projection plus the input-side rows that produce it (see :mod:`ssah_peft.units`).

    * ``mode="select"`` trains ONLY the given units: each targeted weight gets a dense trainable delta
      for its selected rows or columns (the paper's "redundant budget" alignment).
    * ``mode="protect"`` trains a low-rank update B·A of every weight in the targeted blocks EXCEPT the
      slices of the given units, whose rows of B / columns of A are held at exactly zero (the paper's
      "freeze the safety-critical units" fine-tuning).

    Args:
        units: ``{layer: {"mlp": indices, "attn": indices}}`` or a :class:`ssah_peft.UnitMap` (select mode takes
            its redundant units, protect mode its protect set).
        mode: ``"select"`` or ``"protect"``.
        r: rank of the protect-mode update.
        alpha: protect-mode scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter branch input (both modes).
        unit_parts: ``"all"`` (every slice of a unit) or ``"out_proj"`` (its output-projection column only).
        target_blocks: block kinds to adapt, a subset of ``("mlp", "attn")``.
        layers_to_transform: layer indices to adapt (default: all).
        modules_to_save: extra modules trained fully and saved with the adapter (peft semantics).
        delta_dtype: dtype of the trainable tensors (``"float32"``, ``"bfloat16"``, ``"float16"``); default: float32
            for fp16/bf16 bases (peft's autocast) and the base dtype otherwise.
        init_weights: ``True`` starts at the identity (adapted model == base model). ``False`` draws non-zero
            deltas; for tests only.
        architecture: an :class:`ssah_peft.units.ArchitectureSpec` as a dict; resolved from the model type when
            not given and stored, so a saved adapter describes itself.
        model_shapes: layer count and block widths of the base model, recorded at creation and checked when the
            adapter is loaded into another model.
        target_modules: derived at injection from the units and the architecture (a regex over module names);
            not meant to be set by hand.
    """

    units: Optional[UnitsDict] = field(default=None, metadata={"help": "{layer: {'mlp': [...], 'attn': [...]}}"})
    mode: Literal["select", "protect"] = field(default="protect", metadata={"help": "'select' or 'protect'"})
    r: int = field(default=16, metadata={"help": "Rank of the protect-mode low-rank update"})
    alpha: float = field(default=32.0, metadata={"help": "Protect-mode scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch input"})
    unit_parts: Literal["all", "out_proj"] = field(
        default="all", metadata={"help": "'all' slices of a unit or only its output-projection column"}
    )
    target_blocks: list[str] = field(default_factory=lambda: list(BLOCK_KINDS))
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    delta_dtype: Optional[str] = field(default=None, metadata={"help": f"One of {DELTA_DTYPES} or None"})
    init_weights: bool = field(default=True)
    architecture: Optional[dict[str, Any]] = field(default=None)
    model_shapes: Optional[dict[str, Any]] = field(default=None)
    target_modules: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        # imported here: peft_type is the enum member that ssah_peft.tuner adds to peft's PeftType
        from peft.utils import PeftType

        self.peft_type = PeftType.SSAH
        if self.mode not in ("select", "protect"):
            raise ValueError(f"mode must be 'select' or 'protect', got {self.mode!r}")
        if self.units is None:
            raise ValueError("SSAHConfig needs `units`: {layer: {'mlp': indices, 'attn': indices}} or a UnitMap")
        if hasattr(self.units, "config_units"):  # a UnitMap
            self.units = self.units.config_units(self.mode)
        self.units = normalize_units(self.units)
        if self.mode == "select" and not any(idx for blocks in self.units.values() for idx in blocks.values()):
            raise ValueError("select mode with no units would train nothing; give at least one unit")
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.unit_parts not in ("all", "out_proj"):
            raise ValueError(f"unit_parts must be 'all' or 'out_proj', got {self.unit_parts!r}")
        if isinstance(self.target_blocks, str):
            self.target_blocks = [self.target_blocks]
        unknown = set(self.target_blocks) - set(BLOCK_KINDS)
        if unknown or not self.target_blocks:
            raise ValueError(f"target_blocks must be a non-empty subset of {BLOCK_KINDS}, got {self.target_blocks}")
        self.target_blocks = [k for k in BLOCK_KINDS if k in self.target_blocks]
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.delta_dtype is not None and self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(f"delta_dtype must be one of {DELTA_DTYPES} or None, got {self.delta_dtype!r}")

    @property
    def scaling(self) -> float:
        """Factor applied to the protect-mode update B·A (select-mode deltas are applied as they are)."""
        return self.alpha / self.r if self.mode == "protect" else 1.0

    def units_of(self, layer: int, kind: str) -> list[int]:
        return self.units.get(str(layer), {}).get(kind, [])

    def torch_delta_dtype(self) -> Optional[torch.dtype]:
        return None if self.delta_dtype is None else getattr(torch, self.delta_dtype)
