"""What a fine-tuning job is asked to do (:class:`FinetuneOptions`), its defaults and the reasons for them, and
the method of the method table (:mod:`ssah_peft.experiments.methods`) that the options select.

A module of its own because the options are read in three places that must agree: the job validates and runs
them (:mod:`.job`), the run directory is pinned to the part of them that decides the result
(:meth:`FinetuneOptions.pinned`), and the report prints them (:mod:`.report`).

**Defaults, and the evidence for them** (README, "The demo"; 3 seeds on SmolLM2-135M):

* ``mode="protect"`` freezing **SCU + all CU**: the only setting that kept refusals through both benign attacks
  (ASR 0.287 ± 0.064 after the task attack, against 0.88–0.90 for full fine-tuning and LoRA; 0.065 after the
  identity shift, against 0.86–0.99). Its costs are printed with it: task accuracy 0.04–0.07 below LoRA's, and
  over-refusal up to 0.722 after the identity shift. The paper's default, SCU + top 6% CU, behaved like LoRA at
  this scale, so it is an option (``CU:0.06``), not the default.
* ``mode="select"`` trains the **RU** (the paper's redundant budget; RU-only alignment matched full fine-tuning's
  ASR at less over-refusal).
* learning rate 3e-4 for protect and LoRA, 6e-4 for select: the rates at which the demo's LoRA learned its task at
  all, and at which RU-only alignment reached full fine-tuning's safety; a constant schedule, as measured.
* rank 8 (alpha 16), batch 4, one epoch, seed 0: the demo's settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..experiments.methods import (
    LORA,
    SSAH_PROTECT_ALL_CU,
    SSAH_SELECT_RU,
    Method,
    UnitSelector,
    ssah_protect,
    ssah_select,
)
from ..unit_map import UNIT_TYPES, UnitMap, UnitsDict
from ..units import union_units

MODES = ("protect", "select", "lora")
#: Unit types frozen (protect) or trained (select) when none are given.
DEFAULT_UNIT_TYPES = {"protect": ("SCU", "CU"), "select": ("RU",), "lora": ()}
#: Learning rate per mode when none is given (module docstring).
DEFAULT_LEARNING_RATES = {"protect": 3e-4, "select": 6e-4, "lora": 3e-4}


@dataclass
class FinetuneOptions:
    """Everything a fine-tuning job needs. Only ``model``, ``data`` and ``out`` are required."""

    model: str
    """Embedded model name (``smollm2-135m-instruct``), local checkpoint folder or hub id."""
    data: str
    """Training data: JSONL/CSV/Parquet file with prompt/response columns or chat ``messages``, or a hub id."""
    out: Path
    mode: str = "protect"
    unit_map: Optional[str] = None
    """A unit map file of this model; None: score the model now."""
    unit_types: Optional[tuple[str, ...]] = None
    """Frozen (protect) or trained (select) unit types; ``"CU:0.06"`` is the most safety-leaning CU making up 6%
    of all units. None: :data:`DEFAULT_UNIT_TYPES`."""
    safety_data: Optional[str] = None
    """Safety calibration pairs (file or built-in name); None: the built-in ``safety_calibration``."""
    utility_data: Optional[str] = None
    """Utility calibration pairs; None: a sample of the training data."""
    calibration_samples: int = 128
    prompt_column: str = "prompt"
    response_column: str = "response"
    split: Optional[str] = None
    eval_data: Optional[str] = None
    """Records whose perplexity is measured; None: a held-out tenth of the training data."""
    safety_eval_data: Optional[str] = None
    """Harmful prompts (JSONL ``prompt``) for the ASR; None: the built-in held-out ``harmful_eval``."""
    eval_limit: Optional[int] = None
    evaluate: bool = True
    max_new_tokens: int = 32
    max_steps: Optional[int] = None
    epochs: float = 1.0
    learning_rate: Optional[float] = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    rank: int = 8
    save_steps: int = 50
    dtype: str = "float32"
    device_map: Optional[str] = None
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    chat_template: Optional[str] = None
    """A Jinja chat template (text) replacing the tokenizer's; needed for a model without one."""
    seed: int = 0
    resume: bool = False
    show_progress: bool = True
    command: Optional[str] = None
    """The command line (or call) that started the job, for the report."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.unit_types is not None:
            self.unit_types = tuple(self.unit_types)
            if self.mode == "lora" and self.unit_types:
                raise ValueError("mode 'lora' trains every unit: it takes no unit types (--protect/--units)")
            parse_unit_types(self.unit_types)
        for name in ("calibration_samples", "batch_size", "grad_accum", "max_length", "rank", "save_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")

    @property
    def types(self) -> tuple[str, ...]:
        return DEFAULT_UNIT_TYPES[self.mode] if self.unit_types is None else self.unit_types

    @property
    def lr(self) -> float:
        return DEFAULT_LEARNING_RATES[self.mode] if self.learning_rate is None else float(self.learning_rate)

    def pinned(self) -> dict[str, Any]:
        """The options that decide the trained adapter: a run directory holds one run of these."""
        settings = asdict(self)
        for name in ("out", "resume", "show_progress", "command", "device_map", "save_steps"):
            settings.pop(name)
        for name in ("eval_data", "safety_eval_data", "eval_limit", "max_new_tokens", "gradient_checkpointing"):
            settings.pop(name)  # evaluation and memory options: they do not change the adapter
        settings.update(unit_types=list(self.types), learning_rate=self.lr)
        return settings


def parse_unit_types(types: Union[str, tuple[str, ...], list[str]]) -> list[tuple[str, Optional[float]]]:
    """``("SCU", "CU:0.06")`` as ``[("SCU", None), ("CU", 0.06)]``; ``ValueError`` naming the known types."""
    if isinstance(types, str):
        types = tuple(t for t in types.split(",") if t.strip())
    parsed = []
    for text in types:
        name, _, fraction = text.strip().partition(":")
        name = name.upper()
        if name not in UNIT_TYPES:
            raise ValueError(f"unknown unit type {text!r}; known: {', '.join(UNIT_TYPES)} (CU:F = the top F of CU)")
        if fraction and name != "CU":
            raise ValueError(f"{text!r}: only CU takes a fraction (CU:0.06 = the most safety-leaning 6% of units)")
        value = None
        if fraction:
            try:
                value = float(fraction)
            except ValueError:
                raise ValueError(f"{text!r}: {fraction!r} is not a number") from None
            if not 0 < value <= 1:
                raise ValueError(f"{text!r}: the fraction must be in (0, 1]")
        parsed.append((name, value))
    if not parsed:
        raise ValueError("no unit types given")
    return parsed


def method_for(options: FinetuneOptions) -> Method:
    """The method of the method table that ``options`` select (the demo's own methods for the defaults)."""
    if options.mode == "lora":
        return LORA
    types = tuple(t.upper() for t in options.types)
    if options.mode == "protect" and types == ("SCU", "CU"):
        return SSAH_PROTECT_ALL_CU
    if options.mode == "select" and types == ("RU",):
        return SSAH_SELECT_RU
    parsed = parse_unit_types(types)

    def choose(unit_map: UnitMap) -> UnitsDict:
        sets = [unit_map.units_of(t) if f is None else unit_map.top_composite(f) for t, f in parsed]
        return union_units(*sets)

    selector = UnitSelector(" + ".join(types), choose)
    builder = ssah_protect if options.mode == "protect" else ssah_select
    return builder(f"ssah_{options.mode}", selector)
