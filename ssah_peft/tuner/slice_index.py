"""The slice indices of an SSAH layer: derived from the config's units, and never replaced by loaded values.

An adapter file stores each layer's indices (``ssah_index``) next to its deltas, so that the file describes itself.
They must equal the indices the config's units give: where they differ (a save interrupted between
``adapter_model.safetensors`` and ``adapter_config.json``, or an edited file) the deltas belong to other units than
the config says. :meth:`ssah_peft.SSAHModel._remap_adapter_state_dict_for_load` checks a whole checkpoint before
peft loads it; :class:`SliceIndexDict` refuses the same disagreement for every other way of loading (transformers'
``load_adapter``, which sets the tensors one by one, and ``load_state_dict``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict


class SliceIndexDict(BufferDict):
    """A persistent :class:`peft.tuners._buffer_dict.BufferDict` of int32 slice indices per adapter.

    Indices are set with ``index_dict[adapter] = tensor`` (at injection, and by peft when it moves an adapter to a
    device). Loading a value into an existing entry, by ``load_state_dict`` or by setting the attribute as
    transformers' loader does, must give the same indices: a ``ValueError`` naming the module says so otherwise.
    """

    def __init__(self, buffers: Optional[dict[str, torch.Tensor]] = None, module_name: Optional[str] = None) -> None:
        super().__init__(buffers, persistent=True)
        self.module_name = module_name
        """Name of the adapted module, for errors (set at injection)."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        owner = prefix.removesuffix(".").rpartition(".")[0] or self.module_name
        for adapter, current in self._buffers.items():
            loaded = state_dict.get(prefix + adapter)
            if isinstance(loaded, torch.Tensor) and current is not None:
                _check_same_indices(owner, adapter, loaded, current)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __setattr__(self, name: str, value: Any) -> None:
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and isinstance(value, torch.Tensor) and buffers.get(name) is not None:
            _check_same_indices(self.__dict__.get("module_name"), name, value, buffers[name])
        super().__setattr__(name, value)


def index_difference(stored: torch.Tensor, expected: torch.Tensor) -> Optional[str]:
    """How stored slice indices differ from those the config gives, or ``None`` when they are the same."""
    if stored.is_meta or expected.is_meta:
        return None  # no values to compare (weights still to be materialized)
    if stored.dim() != 1 or stored.is_floating_point() or stored.is_complex() or stored.dtype == torch.bool:
        dtype = str(stored.dtype).removeprefix("torch.")
        return f"the weights file stores a {dtype} tensor of shape {list(stored.shape)}, not a vector of indices"
    stored_list, expected_list = stored.long().tolist(), expected.long().tolist()
    if len(stored_list) != len(expected_list):
        return f"the weights file stores {len(stored_list)} indices, the config's units give {len(expected_list)}"
    if stored_list != expected_list:
        return (
            f"the weights file stores the indices {_short(stored_list)}, "
            f"the config's units give {_short(expected_list)}"
        )
    return None


#: What to do about a disagreement, for every error that reports one.
ADVICE = (
    "The weights and the config come from different saves (e.g. a save interrupted between "
    "adapter_model.safetensors and adapter_config.json) or one of them was edited; loading them would put the "
    "trained values on other units. Save the adapter again, or restore the adapter_config.json saved with these "
    "weights."
)


def _check_same_indices(module: Optional[str], adapter: str, loaded: torch.Tensor, current: torch.Tensor) -> None:
    difference = index_difference(loaded, current)
    if difference is not None:
        raise ValueError(
            f"The loaded weights and the adapter config disagree on the slices of {module or 'an SSAH layer'} "
            f"(adapter {adapter!r}): {difference}. {ADVICE}"
        )


def _short(values: list[int], limit: int = 16) -> str:
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, … ({len(values)} in all)]"
