"""One fine-tuning run of an experiment: a :class:`~ssah_peft.training.Method` trained on chat SFT data for a fixed
number of steps, and what it cost.

A module of its own because every alignment and attack run of the demo, and every run of
``benchmarks/demo_sweep.py``, trains through :func:`train_method`: the training layer (:mod:`ssah_peft.training`:
the data rendering, optimiser schedule, seeding and TRL trainer that ``ssah-peft finetune`` trains with too)
with the demo's settings and cost accounting, so that methods differ only in what the method table says.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from ..training import Method, sft_dataset, sft_trainer, training_arguments, with_method
from ..unit_map import UnitMap
from .config import DemoConfig


def train_method(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    method: Method,
    steps: int,
    learning_rate: float,
    config: DemoConfig,
    out_dir: Path,
    unit_map: Optional[UnitMap] = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``model`` with ``method`` (its units chosen from ``unit_map``) for ``steps`` steps at a constant
    ``learning_rate`` (:func:`~ssah_peft.training.sft_trainer`); save its peft adapter into
    ``out_dir / "adapter"``.

    ``callbacks`` are passed to the ``Trainer`` (the training curves' measurements, :mod:`.curves`).

    Returns the trained model and its costs: trainable parameters, bytes to store the result (the adapter file,
    or the trainable weights for full fine-tuning) and training wall time.
    """
    model, units = with_method(model, method, unit_map, rank=config.lora_r, seed=config.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = training_arguments(
        out_dir / "trainer",
        max_steps=steps,
        batch_size=config.batch_size,
        learning_rate=learning_rate,
        seed=config.seed,
        show_progress=config.show_progress,
        logging_steps=max(1, steps // 4),
        save_strategy="no",
    )
    dataset = sft_dataset(tokenizer, records, config.max_length)
    trainer = sft_trainer(model, tokenizer, dataset, args, callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if method.adapter is not None:
        model.save_pretrained(out_dir / "adapter")
        stored = (out_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    else:
        stored = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    model.eval()
    info = {
        "method": method.name,
        "steps": steps,
        "examples": len(records),
        "learning_rate": learning_rate,
        "trainable_parameters": trainable,
        "stored_bytes": stored,
        "train_seconds": round(seconds, 2),
    }
    if units is not None:  # what a random control must match: the count of units per layer and kind
        info["unit_counts"] = {
            layer: {kind: len(idx) for kind, idx in blocks.items()} for layer, blocks in units.items()
        }
    return model, info


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its adapter merged into the base weights (a full fine-tuned model as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
