"""ssah-peft: safety-aware sparse fine-tuning of chat LLMs as a peft method.

Importing the package registers the ``SSAH`` method with peft, so ``get_peft_model``,
``PeftModel.from_pretrained`` and transformers' ``load_adapter`` know it.
"""

from .tuner import SSAHConfig, SSAHLayer, SSAHLinear, SSAHModel, merge_and_dequantize
from .units import ARCHITECTURES, ArchitectureSpec, BlockSpec, ProjectionPart, resolve_architecture, unit_slices

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "BlockSpec",
    "ProjectionPart",
    "SSAHConfig",
    "SSAHLayer",
    "SSAHLinear",
    "SSAHModel",
    "merge_and_dequantize",
    "resolve_architecture",
    "unit_slices",
]
