"""`SSAHModel`: injects SSAH layers into the weights that own the configured units."""

from __future__ import annotations

import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import get_quantization_kwargs
from torch import nn

from ..quantization import disable_cpu_4bit_repacking as _disable_cpu_4bit_repacking
from ..units import Axis, ArchitectureSpec, resolve_architecture, unit_slices
from .config import SSAHConfig
from .layer import SSAHLayer, SSAHLinear, supported_base_layer


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


def _validate_units(config: SSAHConfig, shapes: dict[str, Any]) -> None:
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
                    f"units[{layer}][{kind!r}] has index {indices[-1]}, but the block has {width} units (0..{width - 1})"
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


def targeted_layers(config: SSAHConfig, num_layers: int) -> list[int]:
    if config.layers_to_transform is None:
        return list(range(num_layers))
    bad = [i for i in config.layers_to_transform if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers_to_transform {bad} out of range for a model with {num_layers} layers")
    return sorted(set(config.layers_to_transform))


def layer_slices(config: SSAHConfig, spec: ArchitectureSpec, layer: int) -> dict[str, tuple[Axis, torch.Tensor]]:
    """Adapted modules of one layer → (axis, slices): trained slices (select) or protected slices (protect).

    Protect mode adapts every module of the targeted blocks, with an empty slice set where no unit is protected;
    select mode adapts only modules that own selected slices.
    """
    rule = "all" if config.mode == "select" else "any"
    result: dict[str, tuple[Axis, torch.Tensor]] = {}
    for kind in config.target_blocks:
        width = config.model_shapes["widths"][kind][layer]
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


def _target_regex(config: SSAHConfig, spec: ArchitectureSpec) -> str:
    """A regex matching exactly the full names of the modules to adapt (peft's ``target_modules``)."""
    per_layer = []
    for layer in targeted_layers(config, config.model_shapes["num_layers"]):
        modules = sorted(layer_slices(config, spec, layer))
        if modules:
            per_layer.append(rf"{layer}\.(?:{'|'.join(re.escape(m) for m in modules)})")
    return rf"(?:.*\.)?{re.escape(spec.layers)}\.(?:{'|'.join(per_layer)})"


class SSAHModel(BaseTuner):
    """Creates an SSAH model from a pretrained transformers model (use through ``peft.get_peft_model``).

    Example::

        >>> from peft import get_peft_model
        >>> from ssah_peft import SSAHConfig
        >>> config = SSAHConfig(units={0: {"mlp": [3, 17], "attn": [5]}}, mode="select")
        >>> model = get_peft_model(base_model, config)
    """

    prefix: str = "ssah_"
    tuner_layer_cls = SSAHLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: SSAHConfig, model_config: dict) -> SSAHConfig:
        return peft_config  # everything model-dependent is derived in _prepare_model, which sees the model

    def _prepare_model(self, peft_config: SSAHConfig, model: nn.Module) -> None:
        """Resolve the architecture, check the units and recorded shapes against the model, derive targets.

        Runs before any module is replaced, so a bad config leaves the model untouched.
        """
        if peft_config.architecture is None:
            spec = resolve_architecture(model.config)
        else:
            spec = ArchitectureSpec.from_dict(peft_config.architecture)
        shapes = model_shapes(model, spec)
        if peft_config.model_shapes is not None and peft_config.model_shapes != shapes:
            raise ValueError(
                "This SSAH adapter was made for a base model with shapes "
                f"{_describe(peft_config.model_shapes)}, but the model it is loaded into has {_describe(shapes)}."
            )
        _validate_units(peft_config, shapes)
        peft_config.architecture = spec.to_dict()
        peft_config.model_shapes = shapes
        peft_config.target_modules = _target_regex(peft_config, spec)
        _disable_cpu_4bit_repacking(model)

    def _create_and_replace(
        self,
        peft_config: SSAHConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        spec = ArchitectureSpec.from_dict(peft_config.architecture)
        layer, module = _locate(spec, peft_config, current_key)
        axis, index = layer_slices(peft_config, spec, layer)[module]
        update_kwargs = dict(
            mode=peft_config.mode,
            axis=axis,
            index=index,
            r=peft_config.r,
            scaling=peft_config.scaling,
            dropout=peft_config.dropout,
            init_weights=peft_config.init_weights,
            inference_mode=peft_config.inference_mode,
        )
        if isinstance(target, SSAHLayer):
            target.update_layer(adapter_name, **update_kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not supported_base_layer(base):
            raise TypeError(
                f"{current_key} is a {type(base).__name__}; SSAH supports torch.nn.Linear, transformers Conv1D and "
                "bitsandbytes Linear4bit / Linear8bitLt"
            )
        new_module = SSAHLinear(target, adapter_name, **get_quantization_kwargs(self.model))
        new_module.update_layer(adapter_name, **update_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's autocast (fp16/bf16 → fp32), then the config's ``delta_dtype`` if one is set."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        dtype = self.peft_config[adapter_name].torch_delta_dtype()
        if dtype is None:
            return
        for module in self.model.modules():
            if isinstance(module, SSAHLayer):
                for name in module.adapter_layer_names:
                    container = getattr(module, name)
                    if adapter_name in container:
                        container[adapter_name] = container[adapter_name].to(dtype)

    def merge_and_dequantize(self, progressbar: bool = False) -> nn.Module:
        """Merge the active adapters exactly into a dequantized copy of a bitsandbytes-quantized base model.

        Every Linear4bit / Linear8bitLt of the model (adapted or not) becomes an ``nn.Linear`` holding its
        dequantized weight, then the adapters are merged in floating point: no requantization error, and the
        protected slices equal the dequantized base weights bit for bit. Returns the unwrapped model.
        """
        for module in self.model.modules():
            if isinstance(module, SSAHLayer) and module.quantization_backend is not None:
                module.base_layer = _dequantized_linear(module.get_base_layer())
                module.quantization_backend = None
        for name, module in list(self.model.named_modules()):
            if _is_bnb_layer(module):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, _dequantized_linear(module))
        model = self.merge_and_unload(progressbar=progressbar)
        for owner in (model, getattr(model, "config", None)):
            for attribute in ("hf_quantizer", "quantization_config"):
                if owner is not None and getattr(owner, attribute, None) is not None:
                    setattr(owner, attribute, None)
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(model, flag, False):
                setattr(model, flag, False)
        return model


def _describe(shapes: dict[str, Any]) -> str:
    widths = {kind: sorted(set(w)) for kind, w in shapes["widths"].items()}
    return f"{shapes['num_layers']} layers, hidden sizes {shapes['hidden_sizes']}, block widths {widths}"


def _locate(spec: ArchitectureSpec, config: SSAHConfig, key: str) -> tuple[int, str]:
    for kind in config.target_blocks:
        for module in spec.modules(kind):
            match = spec.layer_pattern(module).fullmatch(key)
            if match is not None:
                return int(match.group(1)), module
    raise ValueError(f"{key} does not belong to a targeted block of this architecture")  # target regex prevents this


def _is_bnb_layer(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _dequantized_linear(base: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` with the dequantized weight (and the bias) of a bitsandbytes layer."""
    from peft.utils import resolve_quantization_backend

    weight = resolve_quantization_backend(base).get_base_weight(base)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
    linear.to(weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias.to(weight.dtype))
    linear.requires_grad_(False)
    return linear


def merge_and_dequantize(model: nn.Module, progressbar: bool = False) -> nn.Module:
    """Exact merge for a bitsandbytes base: see :meth:`SSAHModel.merge_and_dequantize`.

    Accepts a ``PeftModel`` or an :class:`SSAHModel`.
    """
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, SSAHModel):
        raise TypeError(f"expected a PeftModel with SSAH adapters or an SSAHModel, got {type(model).__name__}")
    return tuner.merge_and_dequantize(progressbar=progressbar)
