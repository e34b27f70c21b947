"""`SSAHConfig`: which units an adapter trains (select) or protects (protect), as a peft config."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from peft.config import PeftConfig

from ..units import BLOCK_KINDS, UnitsDict

DELTA_DTYPES = ("float32", "bfloat16", "float16")


def _finite_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def normalize_units(units: Any) -> UnitsDict:
    """Validate a unit mapping and bring it into the JSON form the config stores.

    Accepts ``{layer: {"mlp": indices, "attn": indices}}`` with int or str layer keys and indices given
    as a flat sequence of integers, a 1-d integer tensor or array. Indices are sorted; negatives, duplicates,
    non-integers (floats, strings, bools, nested lists) and unknown block kinds are errors (a silent fix would hide
    a wrong unit map).
    """
    if not isinstance(units, Mapping):
        raise TypeError(f"units must be a mapping {{layer: {{'mlp': indices, 'attn': indices}}}}, got {type(units)}")
    normalized: UnitsDict = {}
    for layer, blocks in units.items():
        layer_index = _layer_key(layer)
        if layer_index < 0:
            raise ValueError(f"units: negative layer index {layer_index}")
        if not isinstance(blocks, Mapping):
            raise TypeError(f"units[{layer!r}] must map block kinds to indices, got {type(blocks)}")
        per_layer: dict[str, list[int]] = {}
        for kind, indices in blocks.items():
            if kind not in BLOCK_KINDS:
                raise ValueError(f"units[{layer!r}]: unknown block kind {kind!r}; expected one of {BLOCK_KINDS}")
            values = sorted(_unit_indices(indices, f"units[{layer!r}][{kind!r}]"))
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


def _layer_key(layer: Any) -> int:
    """A layer key as an int: an integer (not a bool) or a string of one."""
    if _is_integer(layer):
        return int(layer)
    if isinstance(layer, str):
        try:
            return int(layer)
        except ValueError:
            pass
    raise ValueError(f"units: layer key {layer!r} is not an integer")


def _unit_indices(indices: Any, where: str) -> list[int]:
    """The unit indices of one block as Python ints (``where`` names them in errors)."""
    if isinstance(indices, (torch.Tensor, np.ndarray)):
        dtype = str(indices.dtype).removeprefix("torch.")
        kind = "tensor" if isinstance(indices, torch.Tensor) else "array"
        if indices.ndim > 1:
            raise TypeError(f"{where} must be a flat list of unit indices, got a {indices.ndim}-d {kind}")
        if isinstance(indices, torch.Tensor):
            integer = not (indices.is_floating_point() or indices.is_complex()) and indices.dtype != torch.bool
        else:
            integer = np.issubdtype(indices.dtype, np.integer)
        if not integer and indices.reshape(-1).shape[0] > 0:  # an empty tensor/array of any dtype is no index
            raise TypeError(f"{where} must hold integer unit indices, got an {kind} of {dtype}")
        return [int(i) for i in indices.reshape(-1).tolist()]
    if _is_integer(indices):
        return [int(indices)]  # a single index
    if isinstance(indices, (str, bytes)):
        raise TypeError(f"{where} must be a list of integer unit indices, got the string {indices!r}")
    if isinstance(indices, Mapping) or not isinstance(indices, Iterable):
        raise TypeError(f"{where} must be a list of integer unit indices, got {indices!r}")
    values = []
    for position, item in enumerate(indices):
        if isinstance(item, (torch.Tensor, np.ndarray)) and item.ndim == 0:
            item = item.item()
        if not _is_integer(item):
            raise TypeError(
                f"{where} must hold integer unit indices; item {position} is {item!r} ({type(item).__name__})"
            )
        values.append(int(item))
    return values


CALIBRATION_FACTS = ("method", "data", "num_examples", "data_sha256", "tokens", "max_length", "num_tokens", "model")
"""What the model card tells about the data each score of a unit map came from (not the scores themselves)."""


def unit_map_settings(unit_map: Any) -> dict[str, Any]:
    """What an adapter records about the :class:`ssah_peft.UnitMap` its units came from: the classification settings
    (group fractions, standardisation, ranking), the composite fraction, and per score the scoring method and the
    calibration data's name, size and hash; small enough for ``adapter_config.json``."""
    calibration = {
        side: {key: info[key] for key in CALIBRATION_FACTS if info.get(key) is not None}
        for side, info in (unit_map.calibration or {}).items()
    }
    return {
        "classification": dict(unit_map.settings),
        "composite_fraction": float(unit_map.composite_fraction),
        "calibration": calibration,
    }


def _positive_int(name: str, value: Any, meaning: str) -> int:
    if not _is_integer(value):
        raise TypeError(f"{name} must be a positive integer ({meaning}), got {_show(value, integer=True)}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer ({meaning}), got {_show(value)}")
    return int(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _show(value: Any, integer: bool = False) -> str:
    """``repr`` of a config value, with its type where the type is the problem (``integer``: anything but an int)."""
    if _is_integer(value) or (not integer and isinstance(value, numbers.Real) and not isinstance(value, bool)):
        return repr(int(value) if isinstance(value, numbers.Integral) else float(value))
    return f"{value!r} ({type(value).__name__})"


def _typed_error(value: Any, message: str) -> Exception:
    """TypeError for a value of the wrong type, ValueError for a number out of range."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return ValueError(message) if is_number else TypeError(message)


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
        unit_map_fingerprint: the model a :class:`ssah_peft.UnitMap` given as ``units`` was scored on
            (:func:`ssah_peft.fingerprint.model_fingerprint`: shapes and a weight sample); set from the map, saved
            with the adapter and checked against the model before any module is changed, so a map of another model
            is refused even where its indices happen to fit. ``None`` for plain unit dicts.
        unit_map_settings: how that :class:`ssah_peft.UnitMap` was made (:func:`unit_map_settings`: its
            classification settings and each score's method and calibration data, with the data's hash); set from
            the map and shown in the model card that ``save_pretrained`` writes. ``None`` for plain unit dicts.
        weight_sample: a sample of the base model's weights (:func:`ssah_peft.fingerprint.weight_sample`), recorded
            when the adapter is created and checked when it is loaded: an adapter is refused on another checkpoint
            of the same shapes, and accepted on its own model loaded in another dtype or in 8-bit / 4-bit.
        allow_other_weights: accept a unit map or an adapter made on other weights than the model's (same shapes),
            e.g. a base model's map on its instruct sibling. A permission for this injection only: not saved with
            the adapter, which records the weights of the model it is injected into.
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
    target_blocks: list[str] = field(
        default_factory=lambda: list(BLOCK_KINDS), metadata={"help": f"Block kinds to adapt, a subset of {BLOCK_KINDS}"}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt (default: all)"}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained fully and saved with the adapter (peft semantics)"}
    )
    delta_dtype: Optional[str] = field(default=None, metadata={"help": f"One of {DELTA_DTYPES} or None"})
    init_weights: bool = field(
        default=True, metadata={"help": "Start at the identity (True) or from random deltas (False, for tests)"}
    )
    architecture: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "Where the units are (ArchitectureSpec as a dict); resolved from the model"}
    )
    model_shapes: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "Layer count and block widths of the base model (set at creation, checked)"}
    )
    unit_map_fingerprint: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "Fingerprint of the model the UnitMap of `units` was scored on (set from it)"}
    )
    unit_map_settings: Optional[dict[str, Any]] = field(
        default=None,
        metadata={"help": "How the UnitMap of `units` was made: classification and calibration data (set from it)"},
    )
    weight_sample: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "Sampled weights of the base model the adapter was made on (set at creation)"}
    )
    allow_other_weights: bool = field(
        default=False,
        metadata={"help": "Accept a unit map or adapter made on other weights of the same shapes (not saved)"},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Derived from the units at injection (a regex over module names); not set"}
    )

    def to_dict(self) -> dict[str, Any]:
        """peft's dict of the config, without ``allow_other_weights``: a permission given for one injection must
        not travel with the saved adapter to the next model it is loaded into."""
        result = super().to_dict()
        result.pop("allow_other_weights", None)
        return result

    def __post_init__(self) -> None:
        super().__post_init__()
        # imported here: peft_type is the enum member that ssah_peft.tuner adds to peft's PeftType
        from peft.utils import PeftType

        self.peft_type = PeftType.SSAH
        if self.mode not in ("select", "protect"):
            raise ValueError(f"mode must be 'select' or 'protect', got {self.mode!r}")
        if self.units is None:
            raise ValueError("SSAHConfig needs `units`: {layer: {'mlp': indices, 'attn': indices}} or a UnitMap")
        self.r = _positive_int("r", self.r, "the rank of protect mode's update")
        if not _finite_real(self.alpha) or self.alpha <= 0:
            raise _typed_error(
                self.alpha,
                "alpha must be a finite number > 0 (protect mode scales its update by alpha / r), "
                f"got {_show(self.alpha)}",
            )
        self.alpha = float(self.alpha)
        if not _finite_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise _typed_error(self.dropout, f"dropout must be a number in [0, 1), got {_show(self.dropout)}")
        self.dropout = float(self.dropout)
        if hasattr(self.units, "config_units"):  # a UnitMap: keep the model it was scored on, checked at injection
            fingerprint = dict(self.units.fingerprint)
            if self.unit_map_fingerprint is not None and dict(self.unit_map_fingerprint) != fingerprint:
                raise ValueError(
                    "unit_map_fingerprint differs from the fingerprint of the UnitMap given as units; leave it unset"
                )
            unit_map, self.units = self.units, self.units.config_units(self.mode)
            self.record_unit_map(unit_map)
        if self.unit_map_fingerprint is not None and not isinstance(self.unit_map_fingerprint, Mapping):
            raise TypeError(
                "unit_map_fingerprint must be a model fingerprint (a dict) or None, "
                f"got {_show(self.unit_map_fingerprint)}"
            )
        self.units = normalize_units(self.units)
        if self.mode == "select" and not any(idx for blocks in self.units.values() for idx in blocks.values()):
            raise ValueError("select mode with no units would train nothing; give at least one unit")
        if self.unit_parts not in ("all", "out_proj"):
            raise ValueError(f"unit_parts must be 'all' or 'out_proj', got {self.unit_parts!r}")
        if isinstance(self.target_blocks, str):
            self.target_blocks = [self.target_blocks]
        unknown = set(self.target_blocks) - set(BLOCK_KINDS)
        if unknown or not self.target_blocks:
            raise ValueError(f"target_blocks must be a non-empty subset of {BLOCK_KINDS}, got {self.target_blocks}")
        self.target_blocks = [k for k in BLOCK_KINDS if k in self.target_blocks]
        if _is_integer(self.layers_to_transform):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, (str, bytes, Mapping)) or not isinstance(
                self.layers_to_transform, Iterable
            ):
                raise TypeError(
                    "layers_to_transform must be a layer index or a list of them, "
                    f"got {_show(self.layers_to_transform)}"
                )
            layers = list(self.layers_to_transform)
            for layer in layers:
                if not _is_integer(layer):
                    raise TypeError(
                        f"layers_to_transform must hold integer layer indices; got {_show(layer, integer=True)}"
                    )
            self.layers_to_transform = [int(layer) for layer in layers]
        if not isinstance(self.allow_other_weights, bool):
            raise TypeError(f"allow_other_weights must be True or False, got {_show(self.allow_other_weights)}")
        for name in ("model_shapes", "weight_sample", "unit_map_settings"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"{name} must be a dict or None, got {_show(getattr(self, name))}")
        if self.delta_dtype is not None and self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(f"delta_dtype must be one of {DELTA_DTYPES} or None, got {self.delta_dtype!r}")

    def record_unit_map(self, unit_map: Any) -> None:
        """Record the :class:`ssah_peft.UnitMap` the units come from: its fingerprint (checked against the model at
        injection) and its settings (:func:`unit_map_settings`, shown in the model card).

        Done by the config itself for ``units=unit_map``; call it where the units were chosen from a map by other
        rules (a fine-tuning method's unit selector) and given as a dict, so the adapter still says what made them.
        """
        self.unit_map_fingerprint = dict(unit_map.fingerprint)
        self.unit_map_settings = unit_map_settings(unit_map)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """peft's ``adapter_config.json``, then the adapter's section of the model card (``README.md``,
        :mod:`ssah_peft.tuner.model_card`): ``PeftModel.save_pretrained`` writes its card before saving each
        adapter's config, so the section lands in the card peft just wrote, replacing the one of a previous save."""
        super().save_pretrained(save_directory, **kwargs)
        from .model_card import update_model_card  # the card reads this module's config, not the other way round

        update_model_card(save_directory, self)

    @property
    def scaling(self) -> float:
        """Factor applied to the protect-mode update B·A (select-mode deltas are applied as they are)."""
        return self.alpha / self.r if self.mode == "protect" else 1.0

    def units_of(self, layer: int, kind: str) -> list[int]:
        return self.units.get(str(layer), {}).get(kind, [])

    def torch_delta_dtype(self) -> Optional[torch.dtype]:
        return None if self.delta_dtype is None else getattr(torch, self.delta_dtype)
