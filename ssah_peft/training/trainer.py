"""How every run trains: a method's adapter on the model, the project's training schedule, and TRL's
``SFTTrainer`` on completion-only examples, its output head run only where a response token is predicted.

A module of its own because the demo's runs (:func:`ssah_peft.experiments.finetuning.train_method`), the
benchmarks and ``ssah-peft finetune`` (:mod:`ssah_peft.finetuning.job`) must train the same way: the adapter's
random init seeded at the same point, a constant learning rate without weight decay, examples tokenized by the
project (:mod:`.data`, every assistant turn labelled, the rest -100) and handed to TRL as processed, the same loss,
and optionally TRL's padding-free packing. Each caller adds only what is its own (steps or epochs, checkpoints,
logging).

The loss is the mean cross-entropy of the labelled tokens over all accumulated batches, as transformers' and TRL's.
TRL computes it with a fused output head on the labelled positions (``trl.trainer.utils.add_fused_lm_head``); on
CPUs its tiled kernel made a step slower than transformers' plain loss on the full logits, so
:class:`ResponseLossSFTTrainer` keeps the project's own: the model's forward with ``logits_to_keep`` = the positions
that predict a labelled token in any row (``benchmarks/response_loss.py`` measures the three side by side).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from ..tuner import SSAHConfig
from ..unit_map import UnitMap, UnitsDict
from .data import IGNORED
from .methods import Method


class ResponseLossSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` whose loss runs the output head only on the positions that predict a labelled token.

    The loss is TRL's and transformers' (the mean cross-entropy of the labelled tokens, each predicted from the
    position before it, over the tokens of all accumulated batches); prompt, padding and packing-boundary positions
    are labelled -100 and count for nothing. The model gets ``logits_to_keep`` = the positions that predict a
    labelled token in any row of the batch: the same loss and gradients up to float rounding, at a fraction of the
    head's cost, and faster than TRL's fused head on a CPU. A model whose forward takes no ``logits_to_keep`` is
    trained with TRL's own loss. TRL's per-step metrics (token accuracy, entropy) are not computed.
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
        inputs = dict(inputs, use_cache=False)
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        keep = (targets != IGNORED).any(dim=0).nonzero().flatten()
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits.float()
        loss = F.cross_entropy(
            logits.flatten(0, 1), targets[:, keep].flatten().to(logits.device), ignore_index=IGNORED, reduction="sum"
        )
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORED).sum()
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: the count covers every rank, DDP averages
        return (loss, outputs) if return_outputs else loss

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Writes nothing: TRL writes its card into the checkpoints folder at every save, while the saved adapter
        carries the project's own card (:mod:`ssah_peft.tuner.model_card`)."""


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
    max_length: Optional[int] = None,
    packing: bool = False,
    **options: Any,
) -> SFTConfig:
    """The schedule every run trains with: ``max_steps`` steps (or ``epochs`` when it is -1) at a constant
    ``learning_rate`` without weight decay, ``batch_size`` examples per device, seeded, on the GPU when there is one,
    nothing reported to trackers. ``packing`` packs the examples into rows of ``max_length`` tokens (TRL's
    best-fit-decreasing packing, padding-free: no example attends to another). ``options`` are further
    ``TrainingArguments`` of the caller (logging, checkpoints, gradient accumulation, gradient checkpointing).

    TRL's own defaults that would change a run are set back to transformers': no bf16 autocast (the model trains in
    the dtype it was loaded in), no gradient checkpointing unless asked, no shuffling beyond the sampler's.
    """
    if packing and max_length is None:
        raise ValueError("packing needs a max_length: the length of the rows the examples are packed into")
    return SFTConfig(
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
        max_length=max_length,
        packing=packing,
        packing_strategy="bfd",
        shuffle_dataset=False,
        **{"bf16": False, "gradient_checkpointing": False, "logging_steps": 500, **options},
    )


def sft_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    args: SFTConfig,
    callbacks: Sequence[TrainerCallback] = (),
) -> ResponseLossSFTTrainer:
    """A :class:`ResponseLossSFTTrainer` (TRL's ``SFTTrainer``) of ``model`` on the completion-only examples
    ``dataset`` (:mod:`.data`: ``input_ids`` and ``labels``, -100 outside the assistant turns), which TRL takes as
    processed: it neither re-tokenizes them nor changes their labels; it pads each batch (labels with -100) or, with
    ``args.packing``, packs them."""
    return ResponseLossSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks)
    )
