"""One fine-tuning run of an experiment: chat SFT data with the loss on the response only, trained with a
:class:`~.methods.Method` for a fixed number of steps, and what it cost.

A module of its own because every alignment and attack run of the demo, and every run of
``benchmarks/demo_sweep.py``, trains through :func:`finetune`: the same data rendering, optimiser schedule,
seeding and cost accounting, so that methods differ only in what the method table says.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import get_peft_model
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ..chat import tokenize_exchange
from ..unit_map import UnitMap
from .config import DemoConfig
from .methods import Method


def sft_dataset(tokenizer: PreTrainedTokenizerBase, records: Sequence[Mapping[str, Any]], max_length: int) -> Dataset:
    """Chat-template SFT examples: loss on the assistant turn only (prompt tokens labelled -100).

    A record's optional ``system`` field becomes the system turn; without it the template's default is used,
    as in evaluation.
    """
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for record in records:
        ids, is_response = tokenize_exchange(
            tokenizer, record["prompt"], record["response"], max_length, system_prompt=record.get("system") or None
        )
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([token if response else -100 for token, response in zip(ids, is_response)])
    return Dataset.from_dict(rows)


class ResponseLossTrainer(Trainer):
    """A ``Trainer`` whose causal-LM loss computes the output head's logits only where a label is scored.

    The loss is transformers' own (mean cross-entropy of the response tokens, each predicted from the position
    before it); prompt and padding positions are labelled -100 and contribute nothing to it or to any gradient,
    yet the default forward multiplies every position by the 49,152-wide output head. Here the model gets
    ``logits_to_keep`` = the positions that predict a scored token in any sequence of the batch, which cuts a
    step by about a tenth on the demo's data (the head is a fifth of SmolLM2-135M's flops) and gives the same
    loss and gradients up to float rounding.
    """

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        keep = (targets != -100).any(dim=0).nonzero().flatten()
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits.float()
        loss = F.cross_entropy(
            logits.flatten(0, 1), targets[:, keep].flatten().to(logits.device), ignore_index=-100, reduction="sum"
        )
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        loss = loss / torch.as_tensor(count, device=loss.device)
        return (loss, outputs) if return_outputs else loss


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    method: Method,
    steps: int,
    learning_rate: float,
    config: DemoConfig,
    out_dir: Path,
    unit_map: Optional[UnitMap] = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``model`` with ``method`` (its units chosen from ``unit_map``) for ``steps`` steps at a constant
    ``learning_rate`` (transformers ``Trainer``); save its peft adapter into ``out_dir / "adapter"``.

    Returns the trained model and its costs: trainable parameters, bytes to store the result (the adapter file,
    or the trainable weights for full fine-tuning) and training wall time.
    """
    units = method.units_of(unit_map)
    # Seeded here, not once per demo: the adapter's random init must not depend on which stages ran before it in
    # this process, or a resumed run would train other adapters than an uninterrupted one.
    set_seed(config.seed)
    peft_config = method.peft_config(units, rank=config.lora_r)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=config.seed,
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not config.show_progress,
        dataloader_num_workers=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    dataset = sft_dataset(tokenizer, records, config.max_length)
    trainer = ResponseLossTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if peft_config is not None:
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
