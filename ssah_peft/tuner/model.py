"""`SSAHModel`: injects SSAH layers into the weights that own the configured units."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper, get_quantization_kwargs
from torch import nn

from ..fingerprint import OVERRIDE_ADVICE, check_fingerprint, model_fingerprint, weight_sample_difference
from ..quantization import disable_cpu_4bit_repacking as _disable_cpu_4bit_repacking
from ..units import ArchitectureSpec, resolve_architecture
from .config import SSAHConfig
from .dequantize import cast_parameter, compute_dtype, dequantized_linear, is_bnb_layer, target_dtypes
from .layer import SSAHLayer, SSAHLinear, supported_base_layer
from .loading import listed, slice_problems, tensor_problems, withdraw_adapter
from .plan import ModulePlan, check_rank, check_units, plan_modules, target_regex
from .slice_index import ADVICE
from .variants import UPDATES


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
        """Resolve the architecture, check the units, recorded shapes and weights against the model, derive targets.

        Runs before any module is replaced, so a bad config leaves the model untouched. An adapter being loaded
        (its config records ``weight_sample``) must meet the weights it was made on; a new one built from a unit map
        the weights the map was scored on; ``allow_other_weights`` lifts either check, never the shapes'.
        """
        _disable_cpu_4bit_repacking(model)  # before the weights are read, here or by anyone later
        if peft_config.architecture is None:
            spec = resolve_architecture(model.config)
        else:
            spec = ArchitectureSpec.from_dict(peft_config.architecture)
        fingerprint = model_fingerprint(model, spec)
        shapes = {key: fingerprint[key] for key in ("num_layers", "hidden_sizes", "widths")}
        if peft_config.model_shapes is not None and peft_config.model_shapes != shapes:
            raise ValueError(
                "This SSAH adapter was made for a base model with shapes "
                f"{_describe(peft_config.model_shapes)}, but the model it is loaded into has {_describe(shapes)}."
            )
        sample = fingerprint.get("weight_sample")
        loading = peft_config.weight_sample is not None
        if loading and not peft_config.allow_other_weights:
            difference = weight_sample_difference(peft_config.weight_sample, sample)
            if difference is not None:
                raise ValueError(
                    "This SSAH adapter was made on other weights than those of the model it is loaded into, though "
                    f"the shapes match: {difference}. Load it into the model it was trained on (a config applied once "
                    "records that model: make a new SSAHConfig for another one). "
                    f"{OVERRIDE_ADVICE} With peft: PeftModel.from_pretrained(model, path, allow_other_weights=True)."
                )
        if peft_config.unit_map_fingerprint is not None:  # units from a UnitMap: it must be this model's
            # an adapter being loaded is bound to its own base model's weights (checked above), which may be the map's
            # on purpose only; its map's shapes must still be this model's
            allowed = peft_config.allow_other_weights or loading
            check_fingerprint(peft_config.unit_map_fingerprint, fingerprint, allow_other_weights=allowed)
        check_units(peft_config, shapes)
        self._plan: dict[str, ModulePlan] = plan_modules(peft_config, spec, model, shapes)  # for _create_and_replace
        check_rank(peft_config, self._plan)
        peft_config.architecture = spec.to_dict()
        peft_config.model_shapes = shapes
        if sample is not None:
            peft_config.weight_sample = sample
        peft_config.target_modules = target_regex(spec, self._plan)

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
        planned = self._plan.get(current_key)
        if planned is None:  # matched by the regex, but not one of the planned modules (a stack of the same names)
            raise ValueError(f"{current_key} matches the adapter's target_modules but is no module it plans to adapt")
        update_kwargs = dict(
            mode=peft_config.mode,
            axis=planned.axis,
            index=planned.index,
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
        """peft's key remapping, after checking the checkpoint against its config (:mod:`.loading`).

        peft calls this (from ``set_peft_model_state_dict``: ``PeftModel.from_pretrained`` and ``load_adapter``)
        after injecting the adapter and before loading any weight. Where ``adapter_model.safetensors`` and
        ``adapter_config.json`` disagree (slice indices; missing, unexpected or reshaped tensors) or a tensor holds
        NaN/inf, the injected adapter is taken out again and a ``ValueError`` names the modules and tensors;
        transformers' ``load_adapter`` is covered by :class:`ssah_peft.tuner.slice_index.SliceIndexDict`.
        """
        plan = plan_modules(config, ArchitectureSpec.from_dict(config.architecture), model, config.model_shapes)
        problems = slice_problems(plan, adapter_name, state_dict)
        if problems:
            withdraw_adapter(model, adapter_name)
            raise ValueError(
                f"Cannot load SSAH adapter {adapter_name!r}: the slice indices stored with its weights do not match "
                f"the units of its config.\n{listed(problems)}\n{ADVICE} Nothing was loaded."
            )
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problems = tensor_problems(model, config, adapter_name, remapped)
        if problems:
            withdraw_adapter(model, adapter_name)
            raise ValueError(
                f"Cannot load SSAH adapter {adapter_name!r}: adapter_model.safetensors is incomplete, holds tensors "
                f"its adapter_config.json does not describe, or holds NaN/inf.\n{listed(problems)}\nNothing was "
                "loaded; save the adapter again from a healthy model."
            )
        return remapped

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Pass peft's ``adapter_names`` (one adapter name or ``"__base__"`` per row) to every SSAH layer and
        modules-to-save wrapper for one forward or ``generate`` call (:meth:`SSAHLinear._mixed_batch_forward`).

        ``PeftModel`` calls this around its forward and drops ``adapter_names`` from the base model's arguments, so
        without it the argument would be ignored and every row would get the active adapter. As in peft's LoRA:
        inference only, unknown names are refused, and with beam search each name is repeated for its beams.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
        layers = [module for module in self.model.modules() if isinstance(module, SSAHLayer)]
        known = {name for layer in layers for name in layer.ssah_update}
        unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats each row for its beams
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        hook = partial(_pass_adapter_names, adapter_names=adapter_names)
        handles = [
            module.register_forward_pre_hook(hook, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, (SSAHLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: Optional[str] = None,
    ) -> None:
        """Add ``adapter_name``, whose update is the weighted sum of the updates of ``adapters`` (peft's
        ``add_weighted_adapter``), where SSAH can build it exactly.

        The adapters must be of one mode and act on the same slices (same units, ``unit_parts``, target blocks and
        layers), so that the sum keeps their frozen slices frozen:

        * protect, ``combination_type="cat"``: A and B are stacked, as LoRA's ``cat``, into an adapter of rank
          r1 + r2 + … (``alpha`` = that rank, so scale 1) with the same protected slices;
        * select, ``combination_type="linear"``: the deltas (and bias deltas) are summed with the weights.

        peft's other combinations (``svd``, ``ties``, ``dare_*``, ``magnitude_prune*``, a low-rank ``linear``)
        approximate the sum or prune it, so they are refused, as are adapters with ``modules_to_save``. The new
        adapter is not active until ``set_adapter``.
        """
        configs = self._weighted_adapter_configs(adapters, weights, adapter_name)
        mode = configs[0].mode
        update = UPDATES[mode]
        combination_type = update.combination if combination_type is None else combination_type
        if combination_type != update.combination:
            raise ValueError(
                f"add_weighted_adapter: combination_type={combination_type!r} is not exact for SSAH's {mode} mode. "
                f"Supported: 'cat' for protect adapters (a rank r1 + r2 + ... adapter) and 'linear' for select "
                "adapters (weighted sum of the deltas), each over adapters with the same units."
            )
        rank = sum(config.r for config in configs) if mode == "protect" else configs[0].r
        self.peft_config[adapter_name] = replace(configs[0], r=rank, alpha=float(rank), init_weights=True)
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        self._cast_adapter_dtype(adapter_name)
        for module in self.model.modules():
            if isinstance(module, SSAHLayer) and adapter_name in module.ssah_update:
                update.combine(module, adapter_name, adapters, [float(weight) for weight in weights])

    def _weighted_adapter_configs(
        self, adapters: list[str], weights: list[float], adapter_name: str
    ) -> list[SSAHConfig]:
        """The configs of ``adapters``, after checking that :meth:`add_weighted_adapter` can sum them exactly."""
        if isinstance(adapters, str) or not adapters:
            raise TypeError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
        if len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {weights!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} exists already")
        missing = [name for name in adapters if name not in self.peft_config]
        if missing:
            raise ValueError(f"add_weighted_adapter: no adapter named {', '.join(map(repr, missing))}")
        configs = [self.peft_config[name] for name in adapters]
        if any(config.modules_to_save for config in configs):
            raise ValueError("add_weighted_adapter: adapters with modules_to_save cannot be combined")
        for name, config in zip(adapters[1:], configs[1:]):
            for key in ("mode", "units", "unit_parts", "target_blocks", "layers_to_transform", "architecture"):
                if getattr(config, key) != getattr(configs[0], key):
                    raise ValueError(
                        f"add_weighted_adapter: {name!r} and {adapters[0]!r} differ in {key}; SSAH sums adapters of "
                        "one mode over the same units exactly ('cat' for protect, 'linear' for select) and nothing else"
                    )
        return configs

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        """peft's unload / ``merge_and_unload``, refusing NaN/inf adapters before any weight is merged."""
        if merge:
            self._refuse_non_finite(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """peft's ``merge_adapter``, refusing NaN/inf adapters before any weight is merged."""
        self._refuse_non_finite(adapter_names, safe_merge)
        super().merge_adapter(adapter_names, safe_merge)

    def _refuse_non_finite(self, adapter_names: Optional[list[str]], safe_merge: bool = False) -> None:
        """Raise ``ValueError`` naming the tensors if an adapter to merge holds NaN/inf; with ``safe_merge`` in
        peft's words, which tools match on.

        peft's ``safe_merge`` finds a broken adapter only in the layer it is merging, after the layers before it
        were merged; the adapter's own tensors are small, so all of them are checked first and nothing is merged.
        """
        names = adapter_names if adapter_names is not None else self.active_adapters
        broken = []
        for module_name, module in self.model.named_modules():
            if not isinstance(module, SSAHLayer):
                continue
            for tensor_name in module.adapter_layer_names:
                tensors = getattr(module, tensor_name)
                for adapter in names:
                    if adapter in tensors and not torch.isfinite(tensors[adapter]).all():
                        broken.append(f"{module_name}.{tensor_name}.{adapter}")
        if broken:
            adapters = sorted({name.rpartition(".")[2] for name in broken})
            if safe_merge:
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapters[0]} seems to be broken")
            raise ValueError(
                f"Cannot merge: NaN/inf in {', '.join(broken[:4])}{' and more' if len(broken) > 4 else ''}; merging "
                f"would write them into the base weights. The adapter {', '.join(adapters)} seems to be broken. "
                "Nothing was merged."
            )

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
        self._refuse_non_finite(None)  # merging into dequantized copies is always checked
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


def _pass_adapter_names(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], adapter_names: Sequence[str]
) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook (with kwargs) that hands ``adapter_names`` to one layer's forward."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _describe(shapes: dict[str, Any]) -> str:
    widths = {kind: sorted(set(w)) for kind, w in shapes["widths"].items()}
    return f"{shapes['num_layers']} layers, hidden sizes {shapes['hidden_sizes']}, block widths {widths}"


def merge_and_dequantize(model: nn.Module, progressbar: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Exact merge for a bitsandbytes base: see :meth:`SSAHModel.merge_and_dequantize`.

    Accepts a ``PeftModel`` or an :class:`SSAHModel`. ``dtype``: the merged model's dtype; by default the compute
    dtype of its 4-bit layers (bfloat16 in the usual QLoRA recipe).
    """
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, SSAHModel):
        raise TypeError(f"expected a PeftModel with SSAH adapters or an SSAHModel, got {type(model).__name__}")
    return tuner.merge_and_dequantize(progressbar=progressbar, dtype=dtype)
