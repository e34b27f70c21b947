"""How every run trains: a method's adapter on the model, the project's training schedule, and a ``Trainer`` whose
causal-LM loss runs the output head only where a response token is predicted.

A module of its own because the demo's runs (:func:`ssah_peft.experiments.finetuning.train_method`), the
benchmarks and ``ssah-peft finetune`` (:mod:`ssah_peft.finetuning.job`) must train the same way: the adapter's
random init seeded at the same point, a constant learning rate without weight decay, completion-only labels padded
by the same collator, and the same loss. Each caller adds only what is its own (steps or epochs, checkpoints,
logging).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from ..tuner import SSAHConfig
from ..unit_map import UnitMap, UnitsDict
from .data import IGNORED
from .methods import Method


class ResponseLossTrainer(Trainer):
    """A ``Trainer`` whose causal-LM loss computes the output head's logits only where a label is scored.

    The loss is transformers' own (mean cross-entropy of the response tokens, each predicted from the position
    before it, over the tokens of all accumulated batches); prompt and padding positions are labelled -100 and
    contribute nothing to it or to any gradient, yet the default forward multiplies every position by the
    vocabulary-wide output head. Here the model gets ``logits_to_keep`` = the positions that predict a scored token
    in any sequence of the batch, which gives the same loss and gradients up to float rounding at a fraction of the
    head's cost (RESULTS.md has the measured step times). A model whose forward takes no ``logits_to_keep`` is
    trained with the default loss.
    """

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Any:
        if not keeps_logits(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        keep = (targets != IGNORED).any(dim=0).nonzero().flatten()
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits.float()
        loss = F.cross_entropy(
            logits.flatten(0, 1), targets[:, keep].flatten().to(logits.device), ignore_index=IGNORED, reduction="sum"
        )
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORED).sum()
        loss = loss / torch.as_tensor(count, device=loss.device)
        return (loss, outputs) if return_outputs else loss


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the causal LM under ``model`` (peft-wrapped or not) takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def with_method(
    model: torch.nn.Module,
    method: Method,
    unit_map: Optional[UnitMap],
    *,
    rank: int,
    seed: int,
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
    allow_other_weights: bool = False,
) -> tuple[torch.nn.Module, Optional[UnitsDict]]:
    """``model`` with ``method``'s adapter (its units chosen from ``unit_map``), and those units; the model itself
    for full fine-tuning.

    An SSAH adapter records the map its units come from (:meth:`ssah_peft.SSAHConfig.record_unit_map`): the tuner
    checks the map's weights against ``model`` (``allow_other_weights``: a map of other weights on purpose) and the
    adapter's model card says how the map was made.

    The seed is set here, right before the adapter is made, not once per process: the adapter's random init must not
    depend on what ran before it, or a resumed run would train another adapter than an uninterrupted one. A 4-bit
    base is prepared for training first (peft's ``prepare_model_for_kbit_training``).
    """
    units = method.units_of(unit_map)
    set_seed(seed)
    peft_config = method.peft_config(units, rank=rank)
    if peft_config is None:
        return model, units
    if unit_map is not None and isinstance(peft_config, SSAHConfig):
        peft_config.record_unit_map(unit_map)
        peft_config.allow_other_weights = allow_other_weights
    from peft import get_peft_model, prepare_model_for_kbit_training

    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, peft_config), units


def training_arguments(
    output_dir: Path,
    *,
    learning_rate: float,
    batch_size: int,
    seed: int,
    show_progress: bool,
    max_steps: int = -1,
    epochs: float = 1.0,
    **options: Any,
) -> TrainingArguments:
    """The schedule every run trains with: ``max_steps`` steps (or ``epochs`` when it is -1) at a constant
    ``learning_rate`` without weight decay, ``batch_size`` examples per device, seeded, on the GPU when there is one,
    nothing reported to trackers. ``options`` are further ``TrainingArguments`` of the caller (logging, checkpoints,
    gradient accumulation)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
        **options,
    )


def response_loss_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> ResponseLossTrainer:
    """A :class:`ResponseLossTrainer` of ``model`` on the SFT examples ``dataset`` (:mod:`.data`), padded per batch
    (labels with -100)."""
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORED)
    return ResponseLossTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=list(callbacks)
    )
