"""Fine-tune a tiny random Llama with SSAH in both modes, save, reload and merge.

    python examples/finetune_tiny.py --out /tmp/ssah-example

* protect: train a low-rank update of every projection EXCEPT the units given (the paper's "freeze the
  safety-critical units" fine-tuning); their weights stay bit-identical.
* select: train ONLY the units given (the paper's "align on the redundant units").

The unit sets here are made up; real ones come from ``ssah-peft score`` (a UnitMap file). Runs offline on a CPU in
seconds: the model is built from a config and the data are random token sequences.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from ssah_peft import SSAHConfig


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config)


def random_dataset(rows: int = 32, length: int = 16) -> Dataset:
    ids = torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def run(mode: str, out: Path, steps: int) -> None:
    # {layer: {"mlp": neuron indices, "attn": attention-channel indices}}; or ssah_peft.UnitMap.load(path)
    units = {0: {"mlp": [3, 17, 64, 90], "attn": list(range(16))}, 1: {"mlp": [5, 6, 7]}}
    config = SSAHConfig(units=units, mode=mode, r=8, alpha=16)
    model = get_peft_model(tiny_llama(), config)
    model.print_trainable_parameters()
    args = TrainingArguments(
        output_dir=str(out / f"{mode}-run"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, steps // 4),
        gradient_checkpointing=True,
    )
    Trainer(model=model, args=args, train_dataset=random_dataset()).train()
    adapter_dir = out / f"{mode}-adapter"
    model.save_pretrained(adapter_dir)
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    print(f"[{mode}] adapter saved to {adapter_dir} ({size / 1024:.1f} KiB)")

    reloaded = PeftModel.from_pretrained(tiny_llama(), adapter_dir).eval()
    probe = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = reloaded(probe).logits
        merged = reloaded.merge_and_unload()
        difference = (merged(probe).logits - adapted).abs().max().item()
    print(f"[{mode}] reloaded and merged; max |merged - adapted| logits = {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/example-tiny"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    for mode in ("protect", "select"):
        run(mode, args.out, args.steps)


if __name__ == "__main__":
    main()
