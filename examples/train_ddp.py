"""Train an SSAH adapter with transformers.Trainer on one process or many (DDP through accelerate / torchrun).

    # one process
    python examples/train_ddp.py --model path/to/causal-lm --units units.json --out out/
    # two processes (GPUs; on CPU add --cpu and the launcher still needs --multi_gpu to start torchrun)
    accelerate launch --multi_gpu --num_processes 2 examples/train_ddp.py --model path/to/causal-lm --out out/
    # 4-bit (NF4) base, QLoRA style; under the launcher too, each process loads the base on its own device
    python examples/train_ddp.py --model path/to/causal-lm --load-in-4bit --out out/

Nothing here is distributed by hand: Trainer and accelerate wrap the peft model in DistributedDataParallel, and
SSAH layers are ordinary modules with ordinary parameters. The data are random token rows (``--rows`` of
``--length`` tokens, seeded) so the script runs anywhere; put your tokenized dataset in their place.
With one row per sample of the global batch, every step sees the whole data set, so a run on N processes with
``--per-device-batch B`` trains the same adapter as one process with ``--per-device-batch N*B``.

With ``--load-in-4bit`` the frozen base is quantized to NF4 (float32 compute) and goes through peft's
``prepare_model_for_kbit_training`` before the adapter is added. DDP broadcasts the packed 4-bit weights from
rank 0 at wrap time like any other parameter; the block scales live in each weight's ``quant_state``, which is
not broadcast, so every process must quantize the same checkpoint the same way (it does: quantization is
deterministic). Every process writes ``adapter-rank{i}.pt`` (its trainable tensors) and ``base-rank{i}.pt`` (the
frozen base as stored, see :func:`frozen_base_state`), so a test can check that the ranks agree.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, set_seed

from ssah_peft import SSAHConfig, disable_cpu_4bit_repacking

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


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
    parser.add_argument("--load-in-4bit", action="store_true", help="quantize the frozen base to bitsandbytes NF4")
    parser.add_argument("--cpu", action="store_true", help="train on CPU (gloo backend when distributed)")
    return parser.parse_args()


def frozen_base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the base model's tensors as stored (of a peft model: its frozen base), named as in the bare base.

    4-bit weights are their packed bytes plus the block scales (``.absmax``) of their ``quant_state``: the scales
    are no parameter or buffer, so DDP never synchronizes them, and a CPU repack would change both.
    """
    peft = isinstance(model, PeftModel)
    state = {}
    for name, param in (model.get_base_model() if peft else model).named_parameters():
        if peft and param.requires_grad:  # the adapter
            continue
        name = name.replace(".base_layer.", ".")
        state[name] = param.detach().cpu().clone()
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            state[f"{name}.absmax"] = quant_state.absmax.detach().cpu().clone()
    return state


def load_base(model: str, load_in_4bit: bool, cpu: bool) -> torch.nn.Module:
    if not load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(model)
    # a 4-bit model cannot be moved after loading, so load it where this process trains: without a device_map,
    # transformers puts it on the current CUDA device (GPU 0 in every process, and even with --cpu)
    on_cpu = cpu or not torch.cuda.is_available()
    device_map = "cpu" if on_cpu else {"": int(os.environ.get("LOCAL_RANK", 0))}
    base = AutoModelForCausalLM.from_pretrained(model, quantization_config=NF4, device_map=device_map)
    disable_cpu_4bit_repacking(base)  # before any forward: an eval-mode forward would repack the weights on CPU
    return base


def main() -> None:
    args = parse_args()
    model = load_base(args.model, args.load_in_4bit, args.cpu)
    if args.load_in_4bit:
        # casts the remaining float weights to float32, freezes the base, enables input grads and checkpointing
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
    trainer = Trainer(
        model=model, args=training_args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
    )
    trainer.train()
    state = trainer.accelerator.state
    adapter = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(adapter, args.out / f"adapter-rank{state.process_index}.pt")  # to check that ranks agree
    torch.save(frozen_base_state(model), args.out / f"base-rank{state.process_index}.pt")
    if trainer.is_world_process_zero():
        model.save_pretrained(args.out / "adapter")
        print(f"saved adapter to {args.out / 'adapter'} (world size {state.num_processes})")


if __name__ == "__main__":
    main()
