"""``--control random``: the same job also trains an adapter on random units of the chosen units' counts, so that a
user sees on their own model whether the choice of units mattered.

A module of its own because the control is the job's evidence, not its product: the project's benchmarks found
random units of the same per-layer and per-kind counts protecting as well as SSAH's choice (README, "Why these
defaults"), so the only honest way to sell a choice on a user's model is to train its control beside it. The control
is the chosen method with its units replaced (:func:`control_method`): the same adapter, data, seed and settings,
on a freshly loaded base model, saved to ``control_adapter/`` and evaluated as the main adapter. Its units are drawn
by :func:`ssah_peft.training.methods.random_like` from a generator seeded with the job's seed, from the counts
alone: the draw is reproducible and does not depend on where the chosen units are.

A resumed job trains the control after the main adapter, continuing from ``control_checkpoints/``; one whose
``control_adapter/`` is complete (its summary, ``control.json``, is written first) does not train it again.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .._files import read_json, write_json
from ..training import Method
from ..training.methods import random_like
from .checkpoints import resume_checkpoint, save_adapter
from .report import loss_points

if TYPE_CHECKING:
    from .job import FinetuneJob

#: The control's adapter folder, its checkpoints and its summary (what the report shows of it) in the run folder.
CONTROL_ADAPTER = "control_adapter"
CONTROL_CHECKPOINTS = "control_checkpoints"
CONTROL_FILE = "control.json"


def control_method(method: Method, seed: int) -> Method:
    """``method`` with its units replaced by random units of the same per-layer and per-kind counts, drawn with a
    generator seeded by ``seed`` (:func:`~ssah_peft.training.methods.random_like`); everything else the same."""
    if method.units is None:
        raise ValueError(f"method {method.name!r} chooses no units: it has no random control")
    return replace(method, name=f"{method.name}_random", units=random_like(method.units, seed))


def train_control(job: FinetuneJob, method: Method, callbacks: list[Any], main: bool) -> dict[str, Any]:
    """Train, evaluate and save the control of ``method`` (the job's method) and return its summary for the report.

    A fresh copy of the base model is loaded (the job's model now carries the main adapter); only the main process
    (``main``) writes. The summary is written before the adapter, so a complete ``control_adapter/`` always has its
    summary, and a resumed job that finds both returns the summary without training.
    """
    o = job.options
    adapter, summary_file = o.out / CONTROL_ADAPTER, o.out / CONTROL_FILE
    if o.resume and adapter.is_dir() and summary_file.is_file():
        print(f"{adapter} is complete: the control is not trained again", flush=True)
        return read_json(summary_file)
    control = control_method(method, o.seed)
    from .. import models  # looked up at call time, as the job does: tests may replace the loader

    base, _ = models.load(o.model, dtype=o.dtype, device_map=o.device_map, load_in_4bit=o.load_in_4bit)
    resume_from = resume_checkpoint(o.out / CONTROL_CHECKPOINTS) if o.resume else None
    model, trainer, seconds = job.train_adapter(
        control, callbacks, base=base, checkpoints=CONTROL_CHECKPOINTS, resume_from=resume_from
    )
    units = control.units_of(job.unit_map)
    summary = {
        "method": control.name,
        "units_drawn": control.units.name,
        "units": sum(len(indices) for blocks in units.values() for indices in blocks.values()),
        "adapter": CONTROL_ADAPTER,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 2),
        "loss_curve": [{"step": s, "loss": loss} for s, loss in loss_points(trainer.state.log_history)],
        "after": job.evaluate_adapter("control_after", model) if o.evaluate else None,
    }
    if main:
        write_json(summary_file, summary)
        save_adapter(model, adapter)
    return summary
