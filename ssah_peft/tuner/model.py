"""`SSAHModel`: injects SSAH layers into the weights that own the configured units."""

from __future__ import annotations

import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import get_quantization_kwargs
from torch import nn

from ..quantization import disable_cpu_4bit_repacking as _disable_cpu_4bit_repacking
from ..unit_map import check_model_fingerprint
from ..units import ArchitectureSpec, Axis, model_shapes, resolve_architecture, unit_slices
from .config import SSAHConfig
from .dequantize import cast_parameter, compute_dtype, dequantized_linear, is_bnb_layer, target_dtypes
from .layer import SSAHLayer, SSAHLinear, supported_base_layer
from .slice_index import ADVICE, index_difference


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


def _target_regex(config: SSAHConfig, spec: ArchitectureSpec, model: nn.Module) -> str:
    """A regex matching exactly the full names of the modules to adapt (peft's ``target_modules``).

    In protect mode a weight whose every slice is protected (common for ``q_proj``/``k_proj`` under GQA, where a
    few protected channels share all query/key rows) is left out: an adapter there could never change anything,
    and peft's rule is that every trainable parameter is one that training can update.
    """
    lengths = _slice_lengths(model, spec)
    per_layer = []
    for layer in targeted_layers(config, config.model_shapes["num_layers"]):
        modules = sorted(
            module
            for module, (axis, index) in layer_slices(config, spec, layer).items()
            if config.mode == "select" or index.numel() < lengths[layer, module][axis]
        )
        if modules:
            per_layer.append(rf"{layer}\.(?:{'|'.join(re.escape(m) for m in modules)})")
    return rf"(?:.*\.)?{re.escape(spec.layers)}\.(?:{'|'.join(per_layer)})"


def _slice_lengths(model: nn.Module, spec: ArchitectureSpec) -> dict[tuple[int, str], dict[Axis, int]]:
    """``(layer, module) → {"out": rows, "in": columns}`` of every block module of ``model``."""
    lengths = {}
    for kind in spec.blocks:
        for module in spec.modules(kind):
            pattern = spec.layer_pattern(module)
            for name, found in model.named_modules():
                match = pattern.fullmatch(name)
                if match is not None:
                    base = found.get_base_layer() if isinstance(found, BaseTunerLayer) else found
                    in_features, out_features = _get_in_out_features(base)
                    lengths[int(match.group(1)), module] = {"out": int(out_features), "in": int(in_features)}
    return lengths


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
        if peft_config.unit_map_fingerprint is not None:  # units from a UnitMap: it must be this model's
            check_model_fingerprint(peft_config.unit_map_fingerprint, model, spec)
        _validate_units(peft_config, shapes)
        peft_config.architecture = spec.to_dict()
        peft_config.model_shapes = shapes
        peft_config.target_modules = _target_regex(peft_config, spec, model)
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
            target.ssah_index.module_name = current_key
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not supported_base_layer(base):
            raise TypeError(
                f"{current_key} is a {type(base).__name__}; SSAH supports torch.nn.Linear, transformers Conv1D and "
                "bitsandbytes Linear4bit / Linear8bitLt"
            )
        new_module = SSAHLinear(target, adapter_name, **get_quantization_kwargs(self.model))
        new_module.update_layer(adapter_name, **update_kwargs)
        new_module.ssah_index.module_name = current_key  # named in errors about loaded indices
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SSAHConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """peft's key remapping, after checking the stored slice indices against the config's units.

        peft calls this (from ``set_peft_model_state_dict``: ``PeftModel.from_pretrained`` and ``load_adapter``)
        after injecting the adapter and before loading any weight. Where ``adapter_model.safetensors`` and
        ``adapter_config.json`` disagree, the injected adapter is taken out again and a ``ValueError`` names the
        modules; transformers' ``load_adapter`` is covered by :class:`ssah_peft.tuner.slice_index.SliceIndexDict`.
        """
        problems = _stored_slice_problems(model, config, adapter_name, state_dict)
        if problems:
            _withdraw_adapter(model, adapter_name)
            listed = "\n".join(f"- {problem}" for problem in problems[:8])
            more = f"\n- and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise ValueError(
                f"Cannot load SSAH adapter {adapter_name!r}: the slice indices stored with its weights do not match "
                f"the units of its config.\n{listed}{more}\n{ADVICE} Nothing was loaded."
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

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

    def merge_and_dequantize(self, progressbar: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge the active adapters exactly into a dequantized copy of a bitsandbytes-quantized base model.

        Every Linear4bit / Linear8bitLt of the model (adapted or not) becomes an ``nn.Linear`` holding its
        dequantized weight; the adapters are merged into a float32 copy of it (no requantization error), which is
        then rounded once to ``dtype``. Returns the unwrapped model, with every floating parameter in ``dtype`` —
        including the norms and embeddings that ``prepare_model_for_kbit_training`` upcast to float32 — so it runs
        and saves (``save_pretrained``) as an ordinary checkpoint of that dtype. Modules that transformers keeps
        in float32 for ``dtype`` (a model's ``_keep_in_fp32_modules(_strict)``) stay float32, as
        ``from_pretrained`` would load them.

        ``dtype`` defaults to the compute dtype of the model's 4-bit layers (``bnb_4bit_compute_dtype``: the dtype
        the adapted model ran them in, so the usual QLoRA recipe gives a bfloat16 model), and to float32 when the
        model has no 4-bit layers (8-bit only) or their compute dtypes differ.

        Exactness: the slices an adapter never changes (the protected ones in protect mode, all but the selected
        ones in select mode) equal the dequantized base weight cast to ``dtype`` bit for bit — with the default,
        the weight the 4-bit layer computed with; with a ``dtype`` at least as wide as the stored one (float32
        for a bf16 checkpoint) the dequantized weight itself. Only one adapted layer is held in float32 at a time.
        """
        if dtype is None:
            dtype = compute_dtype(self.model)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
        from peft.tuners.tuners_utils import onload_layer
        from tqdm.auto import tqdm

        self._check_merge_allowed()
        target_dtype = target_dtypes(self.model, dtype)
        layers = [(name, m) for name, m in self.model.named_modules() if isinstance(m, SSAHLayer)]
        for name, module in tqdm(layers, disable=not progressbar, desc="Dequantizing and merging"):
            with onload_layer(module):
                if module.quantization_backend is not None:
                    module.base_layer = dequantized_linear(module.get_base_layer(), torch.float32)
                    module.quantization_backend = None
                module.merge()  # the active adapters, in float32 for a dequantized base
                base = module.get_base_layer()
                for param_name, param in base.named_parameters():
                    cast_parameter(param, target_dtype(f"{name}.{param_name}"))
        for name, module in list(self.model.named_modules()):
            if is_bnb_layer(module):  # not adapted: nothing to merge, dequantize straight into its dtype
                parent_name, _, child = name.rpartition(".")
                linear = dequantized_linear(module, target_dtype(f"{name}.weight"))
                setattr(self.model.get_submodule(parent_name), child, linear)
        model = self.unload()  # every SSAH layer is merged: this only unwraps them
        for name, param in model.named_parameters():
            cast_parameter(param, target_dtype(name))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "dtype"):
            config.dtype = dtype
        for attribute in ("hf_quantizer", "quantization_config"):
            if getattr(model, attribute, None) is not None:
                setattr(model, attribute, None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config  # saved configs would otherwise carry "quantization_config": null
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(model, flag, False):
                setattr(model, flag, False)
        return model


def _describe(shapes: dict[str, Any]) -> str:
    widths = {kind: sorted(set(w)) for kind, w in shapes["widths"].items()}
    return f"{shapes['num_layers']} layers, hidden sizes {shapes['hidden_sizes']}, block widths {widths}"


def _stored_slice_problems(
    model: nn.Module, config: SSAHConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> list[str]:
    """Where the ``ssah_index`` tensors of a checkpoint differ from the slices the config's units give."""
    spec = ArchitectureSpec.from_dict(config.architecture)
    layers = set(targeted_layers(config, config.model_shapes["num_layers"]))
    expected: dict[int, dict[str, tuple[Axis, torch.Tensor]]] = {}
    stored: set[tuple[int, str]] = set()
    problems = []
    for key, value in state_dict.items():
        if not key.endswith(".ssah_index"):
            continue
        module_name = key.removesuffix(".ssah_index")
        located = _try_locate(spec, config, module_name)
        slices = None
        if located is not None and located[0] in layers:
            if located[0] not in expected:
                expected[located[0]] = layer_slices(config, spec, located[0])
            slices = expected[located[0]].get(located[1])
        if slices is None:
            problems.append(
                f"adapter_model.safetensors stores slice indices for {module_name}, which adapter_config.json's units "
                "do not adapt"
            )
            continue
        stored.add(located)
        difference = index_difference(value, slices[1])
        if difference is not None:
            problems.append(
                f"adapter_model.safetensors and adapter_config.json disagree on the slices of {module_name} "
                f"(adapter {adapter_name!r}): {difference}"
            )
    for name, module in model.named_modules():  # every module the config adapted needs its stored indices
        if isinstance(module, SSAHLayer) and adapter_name in module.ssah_index:
            if _try_locate(spec, config, name) not in stored:
                problems.append(
                    f"adapter_model.safetensors stores no slice indices for {name}, which adapter_config.json's units "
                    "adapt"
                )
    return problems


def _withdraw_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take an adapter whose weights were refused out of the model again, leaving the model as before the load."""
    tuner = getattr(model, "base_model", model)
    if isinstance(tuner, SSAHModel) and adapter_name in tuner.peft_config:
        if list(tuner.peft_config) == [adapter_name]:  # PeftModel.from_pretrained: unwrap the base model
            tuner.unload()
            if getattr(tuner.model, "peft_config", None) is tuner.peft_config:
                del tuner.model.peft_config
        else:  # load_adapter next to other adapters
            tuner.delete_adapter(adapter_name)
        return
    for name, module in list(model.named_modules()):  # injected without a tuner (peft's inject_adapter_in_model)
        if isinstance(module, SSAHLayer) and adapter_name in module.ssah_update:
            if set(module.ssah_update) == {adapter_name}:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
            else:
                module.delete_adapter(adapter_name)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and adapter_name in configs:
        del configs[adapter_name]
        if not configs:
            del model.peft_config


def _try_locate(spec: ArchitectureSpec, config: SSAHConfig, key: str) -> tuple[int, str] | None:
    try:
        return _locate(spec, config, key)
    except ValueError:
        return None


def _locate(spec: ArchitectureSpec, config: SSAHConfig, key: str) -> tuple[int, str]:
    for kind in config.target_blocks:
        for module in spec.modules(kind):
            match = spec.layer_pattern(module).fullmatch(key)
            if match is not None:
                return int(match.group(1)), module
    raise ValueError(f"{key} does not belong to a targeted block of this architecture")  # target regex prevents this


def merge_and_dequantize(model: nn.Module, progressbar: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Exact merge for a bitsandbytes base: see :meth:`SSAHModel.merge_and_dequantize`.

    Accepts a ``PeftModel`` or an :class:`SSAHModel`. ``dtype``: the merged model's dtype; by default the compute
    dtype of its 4-bit layers (bfloat16 in the usual QLoRA recipe).
    """
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, SSAHModel):
        raise TypeError(f"expected a PeftModel with SSAH adapters or an SSAHModel, got {type(model).__name__}")
    return tuner.merge_and_dequantize(progressbar=progressbar, dtype=dtype)
