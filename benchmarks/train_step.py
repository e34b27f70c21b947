"""Cost of one training step (forward + backward + optimizer) of ssah-peft against the alternatives.

    python benchmarks/train_step.py --size tiny --repeats 5
    python benchmarks/train_step.py --size smollm2-135m --repeats 3 --batch 4 --seq 256
    python benchmarks/train_step.py --size tiny --quant nf4          # QLoRA setting: bitsandbytes 4-bit base
    python benchmarks/train_step.py --methods protect "=LoRA" --repeats 15 --no-memory  # a focused comparison
    python benchmarks/train_step.py --size 1b --device cuda           # on a GPU

Every method trains the same random Llama-shaped model (random weights cost the same as real ones). Step times
are measured in ONE process, methods interleaved within each repeat, and reported as medians and as ratios to
LoRA r=16 measured side by side (also paired: each sample over LoRA's sample of the same repeat, so slow drifts
of a shared machine cancel). Peak memory: on CUDA ``max_memory_allocated`` above the loaded base model; on
CPU the peak resident set size (sampled every 2 ms) above the loaded base model, each method in a fresh
subprocess so one method's freed memory cannot hide another's. The "floor" is the same model with everything
frozen but the input embeddings' output requiring grad: forward plus activation backward, no parameter update.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from memory import peak_rss_above_start  # benchmarks/memory.py (the script's folder is on sys.path)
from peft import ShiraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from ssah_peft.experiments.methods import lora_config, protect_config, select_config

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Llama-style shapes: a CI-fast toy, the embedded SmolLM2-135M, ~1B (Llama-3.2-1B) and ~7B (Llama-2-7B) widths.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}


@dataclass
class Setup:
    size: str
    dtype: torch.dtype
    quant: str
    device: str
    batch: int
    seq: int

    def model_config(self) -> Any:
        return AutoConfig.for_model("llama", tie_word_embeddings=True, **SIZES[self.size])


def random_units(config: Any, fraction: float, seed: int = 0) -> dict[int, dict[str, list[int]]]:
    """``fraction`` of the MLP neurons and of the attention channels of every layer, drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    widths = {
        "mlp": config.intermediate_size,
        "attn": config.num_attention_heads * (config.hidden_size // config.num_attention_heads),
    }
    units = {}
    for layer in range(config.num_hidden_layers):
        units[layer] = {
            kind: torch.randperm(width, generator=generator)[: max(1, round(fraction * width))].sort().values.tolist()
            for kind, width in widths.items()
        }
    return units


def trainable_count(config: Any, peft_config: Any) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return get_peft_model(model, peft_config).get_nb_trainable_parameters()[0]


def lora_equal_fraction(config: Any) -> float:
    """The select-mode unit fraction whose trainable parameter count equals LoRA r=16 on all projections."""
    target = trainable_count(config, lora_config(rank=16))
    fraction = 0.05
    for _ in range(3):  # the count is close to linear in the fraction; two corrections land within a few units
        count = trainable_count(config, select_config(random_units(config, fraction)))
        fraction *= target / count
    return fraction


def method_table(config: Any) -> dict[str, Callable[[], Any] | None]:
    """Method name → the peft config (None: full fine-tuning or the frozen floor). LoRA, select and protect are
    built as the experiments' method table builds them (``ssah_peft.experiments.methods``), on random units."""
    equal = lora_equal_fraction(config)
    return {
        "floor": None,
        "full": None,
        **{f"lora r={r}": (lambda r=r: lora_config(rank=r)) for r in (8, 16, 64)},
        "shira r=16": lambda: ShiraConfig(r=16, target_modules=PROJECTIONS),
        **{
            f"ssah select {round(f * 100)}%": (lambda f=f: select_config(random_units(config, f)))
            for f in (0.01, 0.05, 0.20)
        },
        f"ssah select {equal * 100:.1f}% (=LoRA r16 params)": lambda: select_config(random_units(config, equal)),
        "ssah protect r=16 (7.5% units)": lambda: protect_config(random_units(config, 0.075), rank=16),
    }


def load_base(setup: Setup, checkpoint: Path) -> torch.nn.Module:
    if setup.quant == "nf4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=setup.dtype
        )
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=quantization, device_map=setup.device, dtype=setup.dtype
        )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=setup.dtype).to(setup.device)


def prepare(name: str, make_config: Callable[[], Any] | None, base: torch.nn.Module):
    """The model to train and its optimizer (None for the floor)."""
    if name == "floor":
        base.requires_grad_(False)
        base.enable_input_require_grads()
        return base, None
    if name == "full":
        base.requires_grad_(True)
        model = base
    else:
        model = get_peft_model(base, make_config())
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    return sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )


def measure_memory(setup: Setup, checkpoint: Path, name: str, steps: int = 2) -> int:
    """Peak memory of training ``name`` above the loaded base model, in bytes (run in a fresh process)."""
    torch.manual_seed(0)
    config = setup.model_config()
    make_config = method_table(config)[name]
    base = load_base(setup, checkpoint)
    batch = torch.randint(0, config.vocab_size, (setup.batch, setup.seq), device=setup.device)
    gc.collect()

    def train() -> None:
        model, optimizer = prepare(name, make_config, base)
        for _ in range(steps):
            train_step(model, optimizer, batch)

    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return peak_rss_above_start(train)[1]


def run(
    setup: Setup, repeats: int, memory: bool, checkpoint: Path, only: list[str] | None = None
) -> list[dict[str, Any]]:
    config = setup.model_config()
    methods = method_table(config)
    if only:  # the reference (LoRA r=16) and the floor are always measured: every ratio needs them
        keep = [name for name in methods if name in ("floor", "lora r=16") or any(s in name for s in only)]
        methods = {name: methods[name] for name in keep}
    if setup.quant == "nf4":
        # full fine-tuning of a 4-bit base is not possible; peft's SHiRA cannot wrap Linear4bit
        methods = {k: v for k, v in methods.items() if k not in ("full", "shira r=16")}
    batch = torch.randint(0, config.vocab_size, (setup.batch, setup.seq), device=setup.device)
    prepared = {}
    for name, make_config in methods.items():
        torch.manual_seed(0)
        model, optimizer = prepare(name, make_config, load_base(setup, checkpoint))
        model.train()
        train_step(model, optimizer, batch)  # warm-up, and creates the optimizer state
        prepared[name] = (model, optimizer)
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for repeat in range(repeats):
        random.Random(repeat).shuffle(order)  # interleaved, in a different order each repeat
        for name in order:
            model, optimizer = prepared[name]
            synchronize(setup.device)
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            synchronize(setup.device)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (model, optimizer) in prepared.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # paired: each sample over LoRA r=16's sample of the same repeat, so slow drifts of the machine cancel
        paired = [t / lora_t for t, lora_t in zip(times[name], times["lora r=16"])]
        rows.append(
            {
                "method": name,
                "trainable_params": trainable if name != "floor" else 0,
                "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                "step_s_median": statistics.median(times[name]),
                "step_s_all": times[name],
                "ratio_to_lora_paired_median": statistics.median(paired),
            }
        )
    del prepared
    gc.collect()
    if memory:
        for row in rows:
            row["peak_memory_bytes"] = memory_in_subprocess(setup, checkpoint, row["method"])
    return rows


def memory_in_subprocess(setup: Setup, checkpoint: Path, name: str) -> int:
    command = [
        sys.executable,
        __file__,
        "--size",
        setup.size,
        "--dtype",
        str(setup.dtype).removeprefix("torch."),
        "--quant",
        setup.quant,
        "--device",
        setup.device,
        "--batch",
        str(setup.batch),
        "--seq",
        str(setup.seq),
        "--checkpoint",
        str(checkpoint),
        "--memory-of",
        name,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def report(setup: Setup, rows: list[dict[str, Any]]) -> str:
    by_name = {row["method"]: row for row in rows}
    lora, floor = by_name["lora r=16"], by_name["floor"]
    lines = [
        f"size={setup.size} dtype={str(setup.dtype).removeprefix('torch.')} quant={setup.quant} device={setup.device} "
        f"batch={setup.batch}x{setup.seq}",
        "",
        "| method | trainable params | optimizer state MiB | step s (median) | step / LoRA r16 | step / LoRA r16"
        " (paired) | overhead above floor s | overhead / LoRA's | peak MiB | peak / LoRA r16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lora_overhead = lora["step_s_median"] - floor["step_s_median"]
    for row in rows:
        overhead = row["step_s_median"] - floor["step_s_median"]
        peak = row.get("peak_memory_bytes")
        peak_cells = f"{peak / 2**20:.0f} | {peak / lora['peak_memory_bytes']:.2f}" if peak is not None else "- | -"
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} | {row['optimizer_state_bytes'] / 2**20:.1f} | "
            f"{row['step_s_median']:.4f} | {row['step_s_median'] / lora['step_s_median']:.2f} | "
            f"{row['ratio_to_lora_paired_median']:.2f} | {overhead:.4f} | "
            f"{overhead / lora_overhead:.2f} | {peak_cells} |"
        )
    return "\n".join(lines)


def plot(setup: Setup, rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars of each method's step time and peak memory over LoRA r=16's (1.0 dashed), the targets' scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lora = next(row for row in rows if row["method"] == "lora r=16")
    metrics = [("step_s_median", "step time / LoRA r=16")]
    if "peak_memory_bytes" in lora:
        metrics.append(("peak_memory_bytes", "peak memory / LoRA r=16"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 0.35 * len(rows) + 1.5), squeeze=False)
    names = [row["method"] for row in rows]
    for ax, (key, label) in zip(axes[0], metrics):
        ratios = [row[key] / lora[key] for row in rows]
        colors = ["#1f77b4" if name.startswith("ssah") else "#7f7f7f" for name in names]
        ax.barh(names, ratios, color=colors)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        for y, ratio in enumerate(ratios):
            ax.text(ratio, y, f" {ratio:.2f}", va="center", fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel(label)
    figure.suptitle(
        f"{setup.size} {str(setup.dtype).removeprefix('torch.')} {setup.quant} {setup.device}, "
        f"batch {setup.batch}x{setup.seq}",
        fontsize="medium",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--quant", choices=["none", "nf4"], default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--methods", nargs="+", metavar="NAME", help="measure only the methods whose names contain one of these"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory subprocesses")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the ratios to LoRA r=16 here")
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    setup = Setup(args.size, getattr(torch, args.dtype), args.quant, args.device, args.batch, args.seq)
    if args.memory_of:
        print(measure_memory(setup, args.checkpoint, args.memory_of))
        return
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "base"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(setup.model_config()).save_pretrained(checkpoint)
        rows = run(setup, args.repeats, not args.no_memory, checkpoint, args.methods)
    table = report(setup, rows)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"setup": str(setup), "rows": rows, "table": table}, indent=2))
    if args.plot:
        print(f"wrote {plot(setup, rows, args.plot)}")


if __name__ == "__main__":
    main()
