"""Operators and allocations of one training step, per method: CPU-measurable evidence for GPU step-time work.

    python benchmarks/ops_per_step.py                       # tiny Llama, with and without gradient checkpointing
    python benchmarks/ops_per_step.py --size smollm2-135m --batch 2 --seq 128

On a GPU every operator is a kernel launch (and most allocate), so an adapter's extra operators per step are what
its step time pays above LoRA's at small ranks, where the matmuls themselves are cheap. These counts do not depend
on the machine: they are the same on any CPU and match what a GPU would run, so they can be compared across
commits without one (run the script on both). Counted with ``torch.profiler`` over one forward + backward +
optimizer step after a warm-up step: every ``aten::`` operator called (top-level and nested); the bytes those
operators move (``dispatch_counts.py``: arguments read, outputs written) over one more step. The "floor" is the
frozen model with input gradients (forward and activation backward, no adapter): an adapter's own cost is its
operators above the floor, per adapted module.
"""

from __future__ import annotations

import argparse

import torch
from dispatch_counts import OperatorCounter  # benchmarks/dispatch_counts.py
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.profiler import ProfilerActivity, profile
from train_step import SIZES, Setup, lora_equal_fraction, random_units  # benchmarks/train_step.py
from transformers import AutoModelForCausalLM

from ssah_peft.experiments.methods import lora_config, protect_config, select_config


def methods(config) -> dict:
    equal = lora_equal_fraction(config)
    return {
        "lora r=16": lambda: lora_config(rank=16),
        "ssah protect r=16 (7.5% units)": lambda: protect_config(random_units(config, 0.075), rank=16),
        "ssah select (=LoRA r16 params)": lambda: select_config(random_units(config, equal)),
    }


def count_step(config, make_peft_config, batch: torch.Tensor, checkpointing: bool) -> tuple[int, int, int]:
    """(aten operators of one step, bytes they move, adapted modules); ``make_peft_config=None``: the frozen
    floor. Bytes as :class:`dispatch_counts.OperatorCounter` counts them, over a further step."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if make_peft_config is None:
        model.requires_grad_(False)
    else:
        model = get_peft_model(model, make_peft_config())
    model.enable_input_require_grads()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state and caches exist from here on
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    operators = sum(1 for e in profiler.events() if e.name.startswith("aten::"))
    counter = OperatorCounter()
    with counter:
        step()
    adapted = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer))
    return operators, counter.bytes_moved, adapted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    setup = Setup(args.size, torch.float32, "none", "cpu", args.batch, args.seq)
    config = setup.model_config()
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    table = methods(config)
    print(f"size {args.size}, batch {args.batch} x {args.seq}, {config.num_hidden_layers} layers, 7 projections each")
    print(
        "| method | checkpointing | adapted modules | aten operators | above the floor, per adapted module | "
        "MiB moved | above the floor, KiB per adapted module |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for checkpointing in (False, True):
        ckpt = "on" if checkpointing else "off"
        floor, floor_bytes, _ = count_step(config, None, batch, checkpointing)
        print(f"| floor (frozen) | {ckpt} | 0 | {floor} | | {floor_bytes / 2**20:.1f} | |")
        for name, make in table.items():
            operators, moved, adapted = count_step(config, make, batch, checkpointing)
            per_module, kib = (operators - floor) / adapted, (moved - floor_bytes) / adapted / 1024
            print(f"| {name} | {ckpt} | {adapted} | {operators} | {per_module:.1f} | {moved / 2**20:.1f} | {kib:.0f} |")


if __name__ == "__main__":
    main()
