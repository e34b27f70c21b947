"""The SSAH peft method: config, tuner model and layers, registered with peft on import."""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


def _add_peft_type(name: str) -> PeftType:
    """Add ``name`` to peft's closed ``PeftType`` enum (needed before ``register_peft_method``).

    peft checks membership in the enum, and transformers' ``load_adapter`` calls ``peft_type.value.lower()``,
    so a plain string key is not enough. The member is added the way ``enum`` builds members itself.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


_add_peft_type("SSAH")

from .config import SSAHConfig  # noqa: E402
from .layer import SSAHLayer, SSAHLinear  # noqa: E402
from .model import SSAHModel, merge_and_dequantize  # noqa: E402


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType.SSAH)
    if registered is SSAHConfig:
        return
    if "ssah_peft_placeholder" in getattr(registered, "__dict__", {}):  # SSAH_PEFT_NO_AUTOLOAD's (_ssah_peft_autoload)
        del PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SSAH]
    register_peft_method(name="ssah", config_cls=SSAHConfig, model_cls=SSAHModel, prefix="ssah_")


_register()

__all__ = ["SSAHConfig", "SSAHLayer", "SSAHLinear", "SSAHModel", "merge_and_dequantize"]
