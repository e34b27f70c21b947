"""Checks of an adapter checkpoint as peft loads it, before any weight is loaded into the model.

peft calls :meth:`SSAHModel._remap_adapter_state_dict_for_load` after injecting the layers that
``adapter_config.json`` describes and before loading ``adapter_model.safetensors`` into them. What the two files
disagree on is found there, and the injected adapter is taken out again (:func:`withdraw_adapter`), so a refused
load leaves the model as it was: slice indices other than the config's units (:func:`slice_problems`), and
tensors missing, unexpected, of another shape or non-finite (:func:`tensor_problems`).
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import SSAHConfig
from .layer import SSAHLayer
from .plan import ModulePlan
from .slice_index import index_difference

PEFT_PREFIX = "base_model.model."
"""The prefix of a saved adapter's keys: the names inside a ``PeftModel``. A model the adapter was injected into
without one (peft's ``inject_adapter_in_model``, transformers' ``load_adapter``) names its modules without it."""


def slice_problems(plan: dict[str, ModulePlan], adapter_name: str, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Where the ``ssah_index`` tensors of a checkpoint differ from the slices of the ``plan`` of its config."""
    problems = []
    stored = set()
    for key, value in state_dict.items():
        if not key.endswith(".ssah_index"):
            continue
        saved_name = key.removesuffix(".ssah_index")
        module_name = saved_name if saved_name in plan else saved_name.removeprefix(PEFT_PREFIX)
        if module_name not in plan:
            problems.append(
                f"adapter_model.safetensors stores slice indices for {saved_name}, which adapter_config.json's units "
                "do not adapt"
            )
            continue
        stored.add(module_name)
        difference = index_difference(value, plan[module_name].index)
        if difference is not None:
            problems.append(
                f"adapter_model.safetensors and adapter_config.json disagree on the slices of {saved_name} "
                f"(adapter {adapter_name!r}): {difference}"
            )
    for module_name in [name for name in plan if name not in stored]:  # every adapted module needs its indices
        problems.append(
            f"adapter_model.safetensors stores no slice indices for {module_name}, which adapter_config.json's units "
            "adapt"
        )
    return problems


def tensor_problems(
    model: nn.Module, config: SSAHConfig, adapter_name: str, remapped: dict[str, torch.Tensor]
) -> list[str]:
    """Where an adapter's stored tensors (keys already mapped to the model's) differ from the tensors its config
    created: missing (the layer would keep running on its initial values), unexpected (silently ignored by peft),
    of another shape (an edited ``r`` or units: a RuntimeError deep in ``load_state_dict`` otherwise), or NaN/inf."""
    model_state = model.state_dict(keep_vars=True)

    def shown(key: str) -> str:  # the name as adapter_model.safetensors stores it
        return key.removeprefix(PEFT_PREFIX).removesuffix(f".{adapter_name}")

    problems = []
    stored = set()
    for key, value in remapped.items():
        model_key = key if key in model_state else key.removeprefix(PEFT_PREFIX)
        if model_key not in model_state:
            problems.append(f"{shown(key)} is stored, but adapter_config.json's adapter has no such tensor")
            continue
        stored.add(model_key)
        expected = model_state[model_key]
        if tuple(value.shape) != tuple(expected.shape):
            low_rank = ".ssah_A." in model_key or ".ssah_B." in model_key
            rank = f" (r={config.r} in adapter_config.json)" if low_rank else ""
            problems.append(
                f"{shown(key)} has shape {list(value.shape)}, but adapter_config.json gives "
                f"{list(expected.shape)}{rank}"
            )
        elif value.is_floating_point() and not torch.isfinite(value).all():
            problems.append(f"{shown(key)} holds NaN/inf values")
    for module_name, module in model.named_modules():
        if isinstance(module, SSAHLayer) and adapter_name in module.ssah_update:
            for tensor_name in module.adapter_layer_names:
                key = f"{module_name}.{tensor_name}.{adapter_name}"
                if adapter_name in getattr(module, tensor_name) and key not in stored:
                    problems.append(f"{shown(key)} is missing: that layer would run on its initial values")
    return problems


def withdraw_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take an adapter whose weights were refused out of the model again, leaving the model as before the load."""
    tuner = getattr(model, "base_model", model)
    if isinstance(tuner, BaseTuner) and isinstance(tuner.peft_config.get(adapter_name), SSAHConfig):
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


def listed(problems: list[str], limit: int = 8) -> str:
    more = f"\n- and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n".join(f"- {problem}" for problem in problems[:limit]) + more
