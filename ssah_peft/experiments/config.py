"""The settings of one demo run (:class:`DemoConfig`) and its two presets, :meth:`DemoConfig.full` and
:meth:`DemoConfig.quick`.

A module of its own because the settings are shared by everything else in this package and depend on none of it:
the stages read them, a run directory is pinned to them (``config.json``, :func:`.caching.check_run_dir`), and
``benchmarks/demo_sweep.py`` varies them. :meth:`DemoConfig.to_json` is that pinned form, so a field added here
makes existing run directories refuse to resume; the learning-rate dicts are keyed by the methods'
:attr:`~.methods.Method.learning_rate_key`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..models import DEFAULT_MODEL
from ..unit_map import DEFAULT_PROPORTIONS

#: The benign fine-tuning attacks an experiment can run: the exact-match task, and the identity-shifting set
#: (Qi et al. 2023).
ATTACK_SETS: tuple[str, ...] = ("task", "identity_shift")


@dataclass
class DemoConfig:
    """Sizes and settings of one demo run: :meth:`full` (the default demo) and :meth:`quick` (smoke-test sizes);
    what each costs is measured in the README's "The demo" and ``benchmarks/results/demo/``."""

    run_dir: Path = Path("runs/demo")
    model: str = DEFAULT_MODEL
    seed: int = 0
    """Of every fine-tuning run (adapter init, data order) and of the ablation check's random control."""
    # data
    calibration_pairs: int = 156
    """Safety and utility calibration pairs scored (each set is cut to this many)."""
    align_safety_examples: int = 104
    align_utility_examples: int = 104
    attack_task_examples: int = 240
    max_length: int = 160
    """Tokens of a training example or a calibration sequence, the chat template's included."""
    # training
    batch_size: int = 4
    align_steps: int = 48
    attack_steps: int = 24
    protect_epoch_factor: int = 1
    """Protect-mode attack runs train this many times ``attack_steps``. The paper doubles their epochs; here
    protect trains as many parameters as LoRA, and at twice the steps it only traded its lower ASR for task
    accuracy along LoRA's curve (``benchmarks/demo_sweep.py``), so the default compares at equal steps."""
    align_learning_rates: dict[str, float] = field(
        default_factory=lambda: {"full": 5e-5, "lora": 1e-3, "ssah_select": 6e-4}
    )
    attack_learning_rates: dict[str, float] = field(
        default_factory=lambda: {"full": 1e-5, "lora": 3e-4, "ssah_protect": 3e-4}
    )
    """A moderate attack: at 1e-3 (LoRA) every method, protect included, lost all refusals (ASR 1.0), which hides
    any difference; ``benchmarks/demo_sweep.py`` measured the choices (README, "The demo")."""
    lora_r: int = 8
    # units
    redundant_fraction: float = 0.2
    """Share of all units trained by the RU-only alignment (the paper's 20% redundant budget)."""
    scu_fraction: float = DEFAULT_PROPORTIONS["scu"]
    ucu_fraction: float = DEFAULT_PROPORTIONS["ucu"]
    ru_fraction: float = DEFAULT_PROPORTIONS["ru"]
    """Unit-type proportions of the unit maps (the paper's Llama-2-7B-Chat figures, as ``ssah-peft score``)."""
    top_composite_fraction: float = 0.06
    """CU frozen besides the SCU in the "SCU + top CU" protect run (the paper's 6%)."""
    aligned_method: str = "ssah_select"
    """The alignment run whose model becomes the base of stages 3 and 4."""
    attacks: list[str] = field(default_factory=lambda: ["task"])
    """The attack sets of stage 4 (:data:`ATTACK_SETS`). The identity-shifting attack is not in the default demo, to
    keep the demo within its time budget (the README's "The demo" has the measured account);
    ``benchmarks/frontier.py`` runs it at every budget with three seeds, and ``--attacks task identity_shift`` adds it
    to a demo."""
    migration_runs: list[str] = field(default_factory=lambda: ["task/full", "task/ssah_protect_all_cu"])
    """Attack runs (``data/method``) whose models are scored again: the unit types of the aligned model before and
    after the attack, the paper's attribute migration (Fig. 5)."""
    # evaluation
    harmful_prompts: int = 36
    """Held-out harmful prompts of the ASR, spread over their categories (also the ablation check's count)."""
    overrefusal_prompts: int = 18
    """Benign prompts that merely look sensitive: the over-refusal rate."""
    task_prompts: int = 36
    """Held-out task questions: the exact-match accuracy the attacks train for."""
    perplexity_texts: int = 36
    """Held-out utility answers (and task answers) whose perplexity is measured."""
    probe_prompts: int = 16
    """Harmful prompts of the reasoning-direction probe."""
    max_new_tokens: int = 32
    """Tokens generated per evaluation prompt."""
    generation_batch_size: int = 90
    """Prompts per generation batch; the evaluation generates its harmful, over-refusal and task prompts in one
    call (:func:`ssah_peft.evaluate.generate_together`), so 36 + 18 + 36 share every decoding step."""
    show_progress: bool = True

    def __post_init__(self) -> None:
        unknown = [name for name in self.attacks if name not in ATTACK_SETS]
        if unknown or not self.attacks or len(set(self.attacks)) < len(self.attacks):
            raise ValueError(f"attacks must be distinct names of {ATTACK_SETS}, got {self.attacks}")
        not_run = [key for key in self.migration_runs if _attack_of(key) not in self.attacks]
        if not_run:
            raise ValueError(f"migration_runs {not_run} name attacks that do not run (attacks: {self.attacks})")

    def with_attacks(self, attacks: Sequence[str]) -> DemoConfig:
        """These settings running ``attacks`` (repeats dropped), with the migration runs of those attacks only."""
        attacks = list(dict.fromkeys(attacks))
        kept = [key for key in self.migration_runs if _attack_of(key) in attacks]
        return replace(self, attacks=attacks, migration_runs=kept)

    @classmethod
    def full(cls, run_dir: Path = Path("runs/demo"), **overrides: Any) -> DemoConfig:
        """The default demo: every stage at sizes that fit about 30 minutes on 2 CPU cores."""
        return cls(run_dir=Path(run_dir), **overrides)

    @classmethod
    def quick(cls, run_dir: Path = Path("runs/demo-quick"), **overrides: Any) -> DemoConfig:
        """Every stage at smoke-test sizes (about 3 minutes on 2 CPU cores); the numbers are not meaningful."""
        sizes = dict(
            calibration_pairs=8,
            align_safety_examples=8,
            align_utility_examples=8,
            attack_task_examples=8,
            max_length=96,
            batch_size=2,
            align_steps=2,
            attack_steps=2,
            harmful_prompts=6,
            overrefusal_prompts=3,
            task_prompts=4,
            perplexity_texts=4,
            probe_prompts=4,
            max_new_tokens=8,
            generation_batch_size=13,
        )
        return cls(run_dir=Path(run_dir), **{**sizes, **overrides})

    @property
    def unit_fractions(self) -> dict[str, float]:
        """``scu``, ``ucu``, ``ru`` of a full classification: the aligned model (stage 3) and attacked models."""
        return {"scu": self.scu_fraction, "ucu": self.ucu_fraction, "ru": self.ru_fraction}

    @property
    def alignment_fractions(self) -> dict[str, float]:
        """Only RU, at the alignment budget ``redundant_fraction``: the base model's map (stage 2)."""
        return {"scu": 0.0, "ucu": 0.0, "ru": self.redundant_fraction}

    def to_json(self) -> dict[str, Any]:
        """The settings that determine results. ``run_dir`` and ``show_progress`` do not, nor ``attacks``: it only
        says which attack runs happen, each in a directory of its own, so a run directory resumes with more or
        fewer of them."""
        settings = asdict(self)
        del settings["run_dir"], settings["show_progress"], settings["attacks"]
        return settings


def _attack_of(migration_run: str) -> str:
    """The attack of a migration run's key (``data/method``)."""
    return migration_run.split("/")[0]
