"""ssah-peft: safety-aware sparse fine-tuning of chat LLMs as a peft method.

Importing the package registers the ``SSAH`` method with peft, so ``get_peft_model``,
``PeftModel.from_pretrained`` and transformers' ``load_adapter`` know it.
"""

from . import (
    analysis,  # noqa: E402  (after the modules it builds on)
    data,
    evaluate,
    models,
)
from ._version import __version__ as __version__
from .data import load_builtin
from .evaluate import run_evaluation
from .export import export_adapter, export_lora, export_merged
from .quantization import dense_weight, disable_cpu_4bit_repacking
from .scoring import (
    UnitScores,
    UnitStatistics,
    build_calibration_batches,
    calibration_data_hash,
    merge_partial_scores,
    save_partial_scores,
    score_units,
    unit_statistics,
)
from .tuner import SSAHConfig, SSAHLayer, SSAHLinear, SSAHModel, merge_and_dequantize
from .unit_map import UNIT_TYPES, Migration, UnitMap
from .units import ARCHITECTURES, ArchitectureSpec, BlockSpec, ProjectionPart, resolve_architecture, unit_slices

__all__ = [
    "ARCHITECTURES",
    "FinetuneResult",
    "ArchitectureSpec",
    "BlockSpec",
    "ProjectionPart",
    "SSAHConfig",
    "SSAHLayer",
    "SSAHLinear",
    "SSAHModel",
    "UNIT_TYPES",
    "Migration",
    "UnitMap",
    "UnitScores",
    "UnitStatistics",
    "analysis",
    "build_calibration_batches",
    "calibration_data_hash",
    "data",
    "dense_weight",
    "disable_cpu_4bit_repacking",
    "evaluate",
    "export_adapter",
    "export_lora",
    "export_merged",
    "finetune",
    "load_builtin",
    "merge_and_dequantize",
    "merge_partial_scores",
    "models",
    "resolve_architecture",
    "run_evaluation",
    "save_partial_scores",
    "score_units",
    "unit_slices",
    "unit_statistics",
]


def __getattr__(name: str):
    """``finetune`` and ``FinetuneResult`` are imported on first use: they pull in transformers' ``Trainer``, which
    ``import ssah_peft`` (run whenever peft is imported, see the ``.pth`` hook) should not pay for."""
    if name in ("finetune", "FinetuneResult"):
        from . import finetuning

        return getattr(finetuning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
