"""Which modules an SSAH adapter adapts and how, planned once per injection; and the checks of a config against
the model that must pass before anything is allocated.

:func:`plan_modules` walks the model's modules once and gives each module to adapt its :class:`ModulePlan`: its
layer, its place in the block, the axis of its slices and the slices themselves (trained in select mode, protected
in protect mode). The tuner injects from the plan (peft's ``target_modules`` is derived from it, and
``_create_and_replace`` reads each module's entry), and the check of a loaded checkpoint's slice indices compares
against it, so module names are never parsed back into layers and the units are turned into slices once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

from ..units import ArchitectureSpec, Axis, unit_slices
from .config import SSAHConfig


@dataclass(frozen=True)
class ModulePlan:
    """What an adapter does to one module: its ``layer`` and ``module`` (name inside the layer, as the
    architecture spec names it), and the slices ``index`` along ``axis`` of its weight."""

    layer: int
    module: str
    axis: Axis
    index: torch.Tensor
    in_features: int
    out_features: int


def plan_modules(
    config: SSAHConfig, spec: ArchitectureSpec, model: nn.Module, shapes: dict[str, Any]
) -> dict[str, ModulePlan]:
    """Full module name in ``model`` → :class:`ModulePlan`, for every module the adapter adapts (``shapes``: the
    model's, :func:`ssah_peft.units.model_shapes`).

    In protect mode a weight whose every slice is protected (common for ``q_proj``/``k_proj`` under GQA, where a
    few protected channels share all query/key rows) is left out: an adapter there could never change anything,
    and peft's rule is that every trainable parameter is one that training can update.
    """
    widths = shapes["widths"]
    slices = {
        layer: layer_slices(config, spec, layer, widths) for layer in targeted_layers(config, shapes["num_layers"])
    }
    patterns = {module: spec.layer_pattern(module) for kind in config.target_blocks for module in spec.modules(kind)}
    plan = {}
    for name, found in model.named_modules():
        for module, pattern in patterns.items():
            match = pattern.fullmatch(name)
            if match is None:
                continue
            layer = int(match.group(1))
            if module in slices.get(layer, {}):
                axis, index = slices[layer][module]
                base = found.get_base_layer() if isinstance(found, BaseTunerLayer) else found
                in_features, out_features = (int(n) for n in _get_in_out_features(base))
                if config.mode == "select" or index.numel() < (out_features if axis == "out" else in_features):
                    plan[name] = ModulePlan(layer, module, axis, index, in_features, out_features)
            break
    return plan


def target_regex(spec: ArchitectureSpec, plan: dict[str, ModulePlan]) -> str:
    """peft's ``target_modules``: a regex matching the planned modules, layer by layer (saved with the adapter, so
    its config shows which weights it adapts)."""
    per_layer: dict[int, set[str]] = {}
    for planned in plan.values():
        per_layer.setdefault(planned.layer, set()).add(planned.module)
    alternatives = [
        rf"{layer}\.(?:{'|'.join(re.escape(m) for m in sorted(modules))})"
        for layer, modules in sorted(per_layer.items())
    ]
    return rf"(?:.*\.)?{re.escape(spec.layers)}\.(?:{'|'.join(alternatives)})"


def targeted_layers(config: SSAHConfig, num_layers: int) -> list[int]:
    if config.layers_to_transform is None:
        return list(range(num_layers))
    bad = [i for i in config.layers_to_transform if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers_to_transform {bad} out of range for a model with {num_layers} layers")
    return sorted(set(config.layers_to_transform))


def layer_slices(
    config: SSAHConfig, spec: ArchitectureSpec, layer: int, widths: dict[str, list[int]]
) -> dict[str, tuple[Axis, torch.Tensor]]:
    """Adapted modules of one layer → (axis, slices): trained slices (select) or protected slices (protect).

    Protect mode adapts every module of the targeted blocks, with an empty slice set where no unit is protected;
    select mode adapts only modules that own selected slices.
    """
    rule = "all" if config.mode == "select" else "any"
    result: dict[str, tuple[Axis, torch.Tensor]] = {}
    for kind in config.target_blocks:
        width = widths[kind][layer]
        units = torch.tensor(config.units_of(layer, kind), dtype=torch.long)
        slices = unit_slices(spec, kind, units, width, rule, config.unit_parts)
        if config.mode == "protect":
            block = spec.blocks[kind]
            axes = {block.out_proj: "in", **{p.module: "out" for p in block.in_parts}}
            for module, axis in axes.items():
                slices.setdefault(module, (axis, torch.empty(0, dtype=torch.long)))
        for module, (axis, index) in slices.items():
            if module in result:
                other_axis, other = result[module]
                if other_axis != axis:
                    raise ValueError(f"{module!r} would need row and column slices; one axis per weight is supported")
                index = torch.cat([other, index]).unique()
            result[module] = (axis, index)
    return result


def check_units(config: SSAHConfig, shapes: dict[str, Any]) -> None:
    """Units must exist in the model; protect mode must leave something to train."""
    num_layers = shapes["num_layers"]
    for layer, blocks in config.units.items():
        if int(layer) >= num_layers:
            raise ValueError(f"units name layer {layer}, but the model has {num_layers} layers (0..{num_layers - 1})")
        for kind, indices in blocks.items():
            if kind not in shapes["widths"]:
                raise ValueError(f"units name block kind {kind!r}, which this architecture does not have")
            width = shapes["widths"][kind][int(layer)]
            if indices and indices[-1] >= width:
                raise ValueError(
                    f"units[{layer}][{kind!r}] has index {indices[-1]}, "
                    f"but the block has {width} units (0..{width - 1})"
                )
    layers = targeted_layers(config, num_layers)
    if config.mode == "protect":
        all_protected = all(
            len(config.units_of(layer, kind)) == shapes["widths"][kind][layer]
            for layer in layers
            for kind in config.target_blocks
        )
        if all_protected:
            raise ValueError("protect mode protects every unit of every targeted block: nothing would be trained")
    elif not any(config.units_of(layer, kind) for layer in layers for kind in config.target_blocks):
        raise ValueError(
            f"select mode: no units in the targeted layers {layers} and blocks {config.target_blocks}; nothing to train"
        )


def check_rank(config: SSAHConfig, plan: dict[str, ModulePlan]) -> None:
    """Refuse a protect-mode rank no planned weight could use, before anything is allocated.

    Each adapted weight gets A ``[r, in]`` and B ``[out, r]``: ``r=10**7`` in an edited adapter_config.json would ask
    for gigabytes per weight. A rank above a weight's smaller side adds nothing; above its larger side it is a
    mistake.
    """
    largest = max((max(p.in_features, p.out_features) for p in plan.values()), default=0)
    if config.mode == "protect" and plan and config.r > largest:
        raise ValueError(
            f"r={config.r} exceeds every side of the weights it would adapt (the largest is {largest}); a rank above a "
            "weight's smaller side adds nothing. Use a smaller r (check r in adapter_config.json)."
        )
