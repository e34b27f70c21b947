"""Saved adapter bytes of each method against the theoretical bytes of its tensors, and load time.

    python benchmarks/adapter_size.py --size smollm2-135m

Theoretical bytes = the trainable tensors plus the index tensors a method must store (SSAH's int32 unit slices,
SHiRA's sparse coordinates), nothing else. The target for ssah-peft is ≤ 1.02 × theoretical + 16 KiB. Load time is
the median of ``PeftModel.from_pretrained`` onto a fresh base model over a few repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from train_step import SIZES, Setup, method_table
from transformers import AutoModelForCausalLM


def stored_tensor_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all tensors in the file, bytes of its integer index tensors)."""
    total = index = 0
    with safe_open(path, "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            size = tensor.numel() * tensor.element_size()
            total += size
            if not tensor.is_floating_point():
                index += size
    return total, index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup = Setup(args.size, torch.float32, "none", "cpu", 1, 1)
    config = setup.model_config()
    torch.manual_seed(0)
    base_state = AutoModelForCausalLM.from_config(config).state_dict()

    def fresh_base() -> torch.nn.Module:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(base_state, assign=True)
        return model

    print(f"size={args.size}\n")
    print("| method | trainable params | theoretical bytes | index bytes | file bytes | file / theoretical | load s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, make_config in method_table(config).items():
        if make_config is None:
            continue
        model = get_peft_model(fresh_base(), make_config())
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            path = Path(directory) / "adapter_model.safetensors"
            stored, index = stored_tensor_bytes(path)
            theoretical = trainable + index
            assert stored == theoretical, f"{name}: the file holds {stored - theoretical} bytes of extra tensors"
            file_bytes = path.stat().st_size
            loads = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                PeftModel.from_pretrained(fresh_base(), directory)
                loads.append(time.perf_counter() - start)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"| {name} | {params:,} | {theoretical:,} | {index:,} | {file_bytes:,} | {file_bytes / theoretical:.4f} | "
            f"{statistics.median(loads):.3f} |"
        )


if __name__ == "__main__":
    main()
