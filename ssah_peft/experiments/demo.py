"""The whole SSAH experiment on one chat model, end to end, as a staged and resumable pipeline.

``make demo`` (``ssah-peft demo``) reproduces the paper's two experiments on the embedded SmolLM2-135M-Instruct,
which is effectively unaligned (keyword ASR about 0.9), so it must be aligned before it can lose safety:

1. **baseline**: ASR on held-out harmful prompts, over-refusal, task accuracy, perplexity of the base model.
2. **align** (the paper's redundant-budget experiment): score the base model, take its redundant units (RU) and
   train ONLY them (``SSAHConfig(mode="select")``) on refusals + benign answers; compare with full fine-tuning
   and LoRA on the same data and step budget; merge the chosen aligned model into a new base.
3. **units**: score the aligned model again and classify its units (SCU, UCU, CU, RU); check the SCU by ablation
   (zeroing them must raise the ASR well above zeroing a random set of the same size, :mod:`ssah_peft.analysis`)
   and probe whether harmful queries lean to refusal or compliance in the base and the aligned model.
4. **attack** (the paper's freezing experiment): fine-tune the aligned model on a benign task (and, when
   ``attacks`` names it, on an identity-shifting set, Qi et al. 2023) with full fine-tuning, LoRA, and SSAH
   protect mode (SCU + top CU frozen; SCU + all CU frozen), the protect runs with ``protect_epoch_factor`` times
   the steps (the paper doubles them; the default is 1, see the field).
5. **report**: ``report.md`` with one table of every run (rates with 95% Wilson intervals), the figures, the
   stability of the unit sets, where the time went (:mod:`.timing`) and the command line.

Every SSAH run of stages 2 and 4 has a random control (:data:`.methods.RANDOM_CONTROLS`): random units with exactly
its count of units per layer and block kind, trained the same way, so the table shows whether the chosen units
matter; stage 3 also compares unit maps of two disjoint calibration halves and of another scorer (:mod:`.stability`).

Every stage writes its results into the run directory (``result.json`` per run, unit maps, adapters, the merged
aligned model) and skips any run whose results are already there, so an interrupted demo resumes where it
stopped. ``config.json`` pins the settings a run directory was made with; another config there is an error,
since mixing results of two settings would make the table lie.

This module only runs the stages in order (:mod:`.stages`) and writes the report (:mod:`.report`).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from ..models import load
from .caching import check_run_dir
from .config import DemoConfig
from .report import DemoResults, write_demo_report
from .stages import ModelLoader, log, stage_align, stage_attack, stage_baseline, stage_units
from .timing import timed


def run_demo(config: DemoConfig, load_base: Optional[ModelLoader] = None, command: Optional[str] = None) -> Path:
    """Run (or resume) every stage and write the report; returns the path of ``report.md``.

    ``load_base`` returns a fresh (model, tokenizer) of the base model on every call; default: ``load(model)``.
    """
    check_run_dir(config)
    torch.manual_seed(config.seed)
    load_base = load_base or (lambda: load(config.model, dtype=torch.float32))
    with timed(config, "–", "process", "run_demo"):  # the wall time of this call, for the report's time table
        baseline = stage_baseline(config, load_base)
        align = stage_align(config, load_base)
        units = stage_units(config, load_base)
        attack = stage_attack(config, units.unit_map)
    results = DemoResults(baseline, align, units, attack)
    path = write_demo_report(config, results, command or shlex.join(sys.argv))
    log(f"report: {path}")
    return path
