"""What a fine-tuning job is asked to do (:class:`FinetuneOptions`), its defaults and the reasons for them, and
the method (:mod:`ssah_peft.training.methods`) that the options select.

A module of its own because the options are read in three places that must agree: the job validates and runs
them (:mod:`.job`), the run directory is pinned to the part of them that decides the result
(:meth:`FinetuneOptions.pinned`), and the report prints them (:mod:`.report`). They are declared once, as the
dataclass's fields with their help, defaults and bounds; ``ssah-peft finetune``'s parser is generated from them, and
every value is checked when the options are made, before anything is loaded or written. It is long (about 460
lines) because each option is declared here once, with its help, bounds and the evidence for its default.

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

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from ..training import LORA, SSAH_PROTECT_ALL_CU, SSAH_SELECT_RU, Method, UnitSelector, ssah_protect, ssah_select
from ..training.methods import budget_selector
from ..unit_map import UNIT_TYPES, UnitMap, UnitsDict
from ..units import union_units

MODES = ("protect", "select", "lora")
#: Controls ``--control`` trains beside the chosen units (:mod:`.control`).
CONTROLS = ("random",)
#: How the units are chosen: by unit type (``types``, the default), or a ``budget`` share of all units ranked by the
#: scores of a scorer, in the order the frontier benchmark ranked that scorer's units
#: (:func:`ssah_peft.unit_map.choose_units`: SSAH's type order for variance, the safety-minus-utility difference for
#: the one-score baselines and the attribution scores of :mod:`ssah_peft.unit_map.attributed`: ``margin_grad``, the
#: refusal margin's attribution on harmful minus utility prompts, and ``conflict``, the margin the user's own data's
#: gradient would take away). The frontier found none of them beating random units of the same counts but SNIP,
#: marginally, so the default stays the unit types.
CHOOSER_RULES = {
    "snip": "difference",
    "wanda": "difference",
    "variance": "types",
    "margin_grad": "difference",
    "conflict": "difference",
}
#: Choosers whose scores are gradients of the weights themselves: they need float weights.
GRADIENT_CHOOSERS = ("margin_grad", "conflict")
CHOOSERS = ("types", *CHOOSER_RULES)
#: Unit types frozen (protect) or trained (select) when none are given.
DEFAULT_UNIT_TYPES = {"protect": ("SCU", "CU"), "select": ("RU",), "lora": ()}
#: Learning rate per mode when none is given (module docstring).
DEFAULT_LEARNING_RATES = {"protect": 3e-4, "select": 6e-4, "lora": 3e-4}


#: The largest seed: transformers' ``set_seed`` also seeds numpy, which takes seeds below 2**32.
MAX_SEED = 2**32 - 1


def _problem(check: Callable[[Any], Any], value: Any) -> Optional[str]:
    """What ``check(value)`` refuses (its ``ValueError``), or None."""
    try:
        check(value)
    except ValueError as error:
        return str(error)
    return None


def _dtype(name: str) -> Optional[str]:
    """What is wrong with a ``dtype`` name (it must name a torch floating-point dtype, or be ``auto``), or None."""
    import torch

    if name == "auto" or (
        isinstance(getattr(torch, name, None), torch.dtype) and getattr(torch, name).is_floating_point
    ):
        return None
    return f"must be auto or a torch floating-point dtype such as float32 or bfloat16, got {name!r}"


def _template_problem(template: str) -> Optional[str]:
    """Why transformers cannot compile ``template`` (a Jinja syntax error, with its line), or None: checked here,
    before any model is loaded, rather than when the first example is rendered. Compiled by transformers' own
    compiler, which knows its extensions (``{% generation %}``, loop controls)."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateError as error:
        line = f"line {error.lineno}: " if getattr(error, "lineno", None) else ""
        return f"is not a valid Jinja chat template: {line}{error.message or error}"
    return None


@dataclass
class FinetuneOptions:
    """Everything a fine-tuning job needs. Only ``model``, ``data`` and ``out`` are required.

    Each field is declared once, here: its type, default, help text and the bounds :meth:`check_value` enforces.
    The ``ssah-peft finetune`` parser is generated from these fields (:mod:`ssah_peft.cli.options`), so the
    command line and the library take the same options with the same defaults and checks. Metadata keys beside
    ``help``: ``minimum`` / ``maximum`` / ``exclusive_minimum`` (bounds of a number), ``choices``, ``check`` (a
    function returning what is wrong with a value, or None), and for the command line only ``metavar``,
    ``exclusive`` (options of one group exclude each other) and ``negation`` (the ``--no-...`` flag and its help
    that turn off a field that is on by default).
    """

    model: str = field(
        metadata={"help": "embedded model name (smollm2-135m-instruct), local checkpoint folder or hub id owner/name"}
    )
    data: str = field(
        metadata={
            "help": "training data: .jsonl/.csv/.parquet with prompt/response columns or chat 'messages' records, "
            "or a hub data set id with --split",
            "metavar": "TRAIN",
        }
    )
    out: Path = field(metadata={"help": "run folder (new or empty, or a run to --resume)", "metavar": "DIR"})
    mode: str = field(default="protect", metadata={"help": "what trains (see above)", "choices": MODES})
    unit_map: Optional[str] = field(
        default=None,
        metadata={"help": "unit map of this model (ssah-peft score) (default: score the model now)", "metavar": "MAP"},
    )
    allow_other_weights: bool = field(
        default=False,
        metadata={
            "help": "use --unit-map although it was scored on other weights of the same shapes (another checkpoint, "
            "e.g. the base model of an instruct --model), on purpose"
        },
    )
    reuse_scores: bool = field(
        default=True,
        metadata={
            "help": "reuse the unit map an earlier job on this machine scored for the same weights, calibration "
            "data and settings (kept in the cache folder, $SSAH_PEFT_CACHE/unit_maps)",
            "negation": ("--rescore", "score the model again even when a map of the same inputs is cached"),
        },
    )
    unit_types: Optional[tuple[str, ...]] = field(
        default=None,
        metadata={
            "help": "unit types frozen (protect) or trained (select), e.g. ('SCU', 'CU:0.06'); CU:F = the most "
            "safety-leaning CU making up a fraction F of all units (default: SCU,CU for protect, RU for select)",
            "check": lambda types: _problem(parse_unit_types, types),
        },
    )
    chooser: str = field(
        default="types",
        metadata={
            "help": "how the units are chosen: by unit type (--protect/--units), or --budget of all units ranked by "
            "the snip, wanda or variance scores, the refusal margin's attribution (margin_grad) or the margin your "
            "data's gradient would take away (conflict), of a map scored now (or --unit-map of that scorer)",
            "choices": CHOOSERS,
        },
    )
    budget: Optional[float] = field(
        default=None,
        metadata={
            "help": "share of all units that --chooser protects (protect) or trains (select), in (0, 1)",
            "metavar": "F",
            "check": lambda budget: None if 0 < budget < 1 else f"must be a share of the units in (0, 1), got {budget}",
        },
    )
    control: Optional[str] = field(
        default=None,
        metadata={
            "help": "also train a control adapter (control_adapter/) on random units of the same per-layer and "
            "per-kind counts as the chosen ones, same data, seed and settings, and report both: whether the choice "
            "of units mattered on this run (default: no control)",
            "choices": CONTROLS,
        },
    )
    safety_data: Optional[str] = field(
        default=None, metadata={"help": "safety calibration pairs (default: built-in safety_calibration)"}
    )
    utility_data: Optional[str] = field(
        default=None, metadata={"help": "utility calibration pairs (default: a sample of --data)"}
    )
    calibration_samples: int = field(default=128, metadata={"help": "pairs scored per set", "minimum": 1})
    prompt_column: str = field(default="prompt", metadata={"help": "column of the user turn"})
    response_column: str = field(default="response", metadata={"help": "column of the answer"})
    split: Optional[str] = field(
        default=None, metadata={"help": "split of a hub data set given as --data (default: none)"}
    )
    eval_data: Optional[str] = field(
        default=None,
        metadata={"help": "records for perplexity (default: a held-out tenth of --data)", "metavar": "EVAL"},
    )
    safety_eval_data: Optional[str] = field(
        default=None,
        metadata={"help": "harmful prompts (a 'prompt' column) for the ASR (default: built-in held-out set)"},
    )
    eval_limit: Optional[int] = field(
        default=None,
        metadata={"help": "prompts per evaluation set, spread over categories (default: all)", "minimum": 1},
    )
    evaluate: bool = field(
        default=True,
        metadata={
            "help": "evaluate safety and perplexity before and after training",
            "negation": ("--no-eval", "skip the before/after evaluation"),
        },
    )
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per eval prompt", "minimum": 1})
    max_steps: Optional[int] = field(
        default=None, metadata={"help": "optimizer steps (default: --epochs)", "minimum": 1, "exclusive": "length"}
    )
    epochs: float = field(
        default=1.0, metadata={"help": "passes over the data", "exclusive_minimum": 0, "exclusive": "length"}
    )
    learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "constant learning rate (default: "
            + ", ".join(f"{lr:g} for {mode}" for mode, lr in DEFAULT_LEARNING_RATES.items())
            + ")",
            "exclusive_minimum": 0,
        },
    )
    batch_size: int = field(default=4, metadata={"help": "examples per device and step", "minimum": 1})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps", "minimum": 1})
    max_length: int = field(
        default=512, metadata={"help": "tokens per example (per packed row with --packing)", "minimum": 1}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "pack the examples into rows of --max-length tokens (TRL's padding-free best-fit packing: fewer, "
            "fuller batches; no example attends to another)"
        },
    )
    skip_truncated: bool = field(
        default=False,
        metadata={"help": "leave out the examples whose whole response --max-length cuts away (default: refuse them)"},
    )
    rank: int = field(default=8, metadata={"help": "rank of protect and lora (alpha = 2·rank)", "minimum": 1})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps", "minimum": 1})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "weight dtype: a torch floating-point dtype name, or auto (the checkpoint's)",
            "check": _dtype,
        },
    )
    device_map: Optional[Union[str, dict[str, Any]]] = field(
        default=None, metadata={"help": "transformers device_map (default: transformers' default, one device)"}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "load the model in bitsandbytes NF4"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    chat_template: Optional[str] = field(
        default=None,
        metadata={
            "help": "a Jinja chat template (text) replacing the tokenizer's; needed for a model without one",
            "check": _template_problem,
        },
    )
    seed: int = field(default=0, metadata={"help": "adapter init and data order", "minimum": 0, "maximum": MAX_SEED})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    show_progress: bool = field(
        default=True, metadata={"help": "show progress bars", "negation": ("--no-progress", "hide progress bars")}
    )
    command: Optional[str] = field(
        default=None, metadata={"help": "the command line (or call) that started the job, for the report"}
    )

    def __post_init__(self) -> None:
        """Check every field (type, finiteness, range) and the fields together, before anything is loaded."""
        for option in fields(self):
            try:
                value = self.check_value(option.name, getattr(self, option.name))
            except ValueError as error:
                raise ValueError(f"{option.name}: {error}") from None
            setattr(self, option.name, value)
        self.out = Path(self.out)
        if self.mode == "lora" and self.unit_types:
            raise ValueError("mode 'lora' trains every unit: it takes no unit types (--protect/--units)")
        if self.chooser != "types":
            if self.mode == "lora":
                raise ValueError(f"mode 'lora' trains every unit: it takes no chooser, got {self.chooser!r}")
            if self.unit_types is not None:
                raise ValueError(
                    f"chooser {self.chooser!r} ranks the units by score: it takes no unit types (--protect/--units)"
                )
            if self.budget is None:
                raise ValueError(f"chooser {self.chooser!r} needs a budget: the share of all units it chooses")
            if self.chooser in GRADIENT_CHOOSERS and self.load_in_4bit and self.unit_map is None:
                raise ValueError(
                    f"chooser {self.chooser!r} scores the units by gradients of the weights, which a 4-bit model has "
                    "not: score a map on the float model first (ssah-peft score, or a finetune job without "
                    "--load-in-4bit) and pass it with --unit-map"
                )
        elif self.budget is not None:
            raise ValueError(
                f"budget is for a chooser by score ({', '.join(CHOOSER_RULES)}); unit types choose their own"
            )
        if self.mode == "lora" and self.control:
            raise ValueError(
                "mode 'lora' trains every unit: it has no chosen units to compare with random ones (--control)"
            )
        if self.mode == "protect" and self.types and _covers_every_unit(self.types):
            raise ValueError(
                f"protecting {','.join(self.types)} freezes every unit: nothing would be trained; protect fewer "
                "unit types (e.g. SCU,CU)"
            )

    @classmethod
    def check_value(cls, name: str, value: Any) -> Any:
        """``value`` as field ``name`` stores it (a tuple of unit types, a float learning rate, a path's text);
        ``ValueError`` saying what is wrong with it, without the field's name (the caller names the option)."""
        option = _FIELDS[name]
        value = _typed(value, _HINTS[name])
        if value is None:
            return value
        metadata = option.metadata
        if "choices" in metadata and value not in metadata["choices"]:
            raise ValueError(f"must be one of {', '.join(metadata['choices'])}, got {value!r}")
        low, high = metadata.get("minimum"), metadata.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            bound = f"> {low - 1}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"must be an integer {bound}, got {value!r}")
        if "exclusive_minimum" in metadata and not value > metadata["exclusive_minimum"]:
            raise ValueError(f"must be a finite number > {metadata['exclusive_minimum']}, got {value!r}")
        problem = metadata["check"](value) if "check" in metadata else None
        if problem:
            raise ValueError(problem)
        return value

    @property
    def types(self) -> tuple[str, ...]:
        """The unit types the units are chosen by; none for a chooser by score."""
        if self.chooser != "types":
            return ()
        return DEFAULT_UNIT_TYPES[self.mode] if self.unit_types is None else self.unit_types

    @property
    def lr(self) -> float:
        return DEFAULT_LEARNING_RATES[self.mode] if self.learning_rate is None else float(self.learning_rate)

    def pinned(self) -> dict[str, Any]:
        """The options that decide the trained adapter: a run directory holds one run of these."""
        settings = asdict(self)
        for name in ("out", "resume", "show_progress", "command", "device_map", "save_steps", "allow_other_weights"):
            settings.pop(name)
        for name in ("reuse_scores",):  # the same map either way
            settings.pop(name)
        for name in ("eval_data", "safety_eval_data", "eval_limit", "max_new_tokens", "gradient_checkpointing"):
            settings.pop(name)  # evaluation and memory options: they do not change the adapter
        settings.update(unit_types=list(self.types), learning_rate=self.lr)
        for name, default in (("control", None), ("chooser", "types"), ("budget", None), ("packing", False)):
            if settings[name] == default:  # a run without them pins what it pinned before they existed
                settings.pop(name)
        return settings


_FIELDS = {option.name: option for option in fields(FinetuneOptions)}
_HINTS = get_type_hints(FinetuneOptions)


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as a value of type ``hint`` (``Optional``/``Union`` of bool, int, float, str, Path, dict and
    ``tuple[str, ...]``); ``ValueError`` for another type. A bool is not a number, a number must be finite, a
    path (``os.PathLike``) is taken where text is, and text where a tuple of text is (comma-separated)."""
    if get_origin(hint) is Union:
        if value is None and type(None) in get_args(hint):
            return None
        problems = []
        for member in get_args(hint):
            if member is type(None):
                continue
            try:
                return _typed(value, member)
            except ValueError as error:
                problems.append(str(error))
        raise ValueError(" or ".join(problems))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be True or False, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        return float(value)
    elif hint is str or hint is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"must be {'a path' if hint is Path else 'text'}, got {value!r}")
        return Path(value) if hint is Path else os.fspath(value)
    elif get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ValueError(f"must be a dict, got {value!r}")
    elif get_origin(hint) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (tuple, list)) or not all(isinstance(item, str) for item in items):
            raise ValueError(f"must be a list of names, got {value!r}")
        return tuple(item.strip() for item in items if item.strip())
    else:  # pragma: no cover - a field of a type this function does not know
        raise TypeError(f"no check for options of type {hint}")
    return value


def _covers_every_unit(types: Sequence[str]) -> bool:
    """Whether the unit types ``types`` (:func:`parse_unit_types`) hold every unit: the four types partition them."""
    whole = {name for name, fraction in parse_unit_types(tuple(types)) if fraction is None}
    return whole >= set(UNIT_TYPES)


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
    builder = ssah_protect if options.mode == "protect" else ssah_select
    if options.chooser != "types":
        rule = CHOOSER_RULES[options.chooser]
        selector = budget_selector(options.budget, options.mode, rule=rule, scorer=options.chooser)
        return builder(f"ssah_{options.mode}_{options.chooser}", selector)
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
    return builder(f"ssah_{options.mode}", selector)
