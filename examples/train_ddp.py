"""Train an SSAH adapter with transformers.Trainer on one process or many (DDP through accelerate / torchrun).

    # one process
    python examples/train_ddp.py --model path/to/causal-lm --units units.json --out out/
    # two processes (GPUs; on CPU add --cpu and the launcher still needs --multi_gpu to start torchrun)
    accelerate launch --multi_gpu --num_processes 2 examples/train_ddp.py --model path/to/causal-lm --out out/
    # 4-bit base, QLoRA style
    python examples/train_ddp.py --model path/to/causal-lm --load-in-4bit --out out/

Nothing here is distributed by hand: Trainer and accelerate wrap the peft model in DistributedDataParallel, and
SSAH layers are ordinary modules with ordinary parameters. The data are random token rows (``--rows`` of
``--length`` tokens, seeded) so the script runs anywhere; put your tokenized dataset in their place.
With one row per sample of the global batch, every step sees the whole data set, so a run on N processes with
``--per-device-batch B`` trains the same adapter as one process with ``--per-device-batch N*B``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, set_seed

from ssah_peft import SSAHConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved causal LM (local path or hub id)")
    parser.add_argument("--units", type=Path, help="JSON {layer: {'mlp': [...], 'attn': [...]}}; default: a few units")
    parser.add_argument("--mode", choices=["select", "protect"], default="protect")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="train on CPU (gloo backend when distributed)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if args.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization)
    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    units = json.loads(args.units.read_text()) if args.units else {0: {"mlp": [1, 2, 3], "attn": list(range(8))}}
    set_seed(0)  # the protect-mode A matrices are drawn at random: same seed, same start on every run
    model = get_peft_model(model, SSAHConfig(units=units, mode=args.mode, r=4))

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.rows, args.length), generator=generator).tolist()
    training_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.per_device_batch,
        learning_rate=args.lr,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=args.cpu,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    state = trainer.accelerator.state
    adapter = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(adapter, args.out / f"adapter-rank{state.process_index}.pt")  # to check that ranks agree
    if trainer.is_world_process_zero():
        model.save_pretrained(args.out / "adapter")
        print(f"saved adapter to {args.out / 'adapter'} (world size {state.num_processes})")


if __name__ == "__main__":
    main()
