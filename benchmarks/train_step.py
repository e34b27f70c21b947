"""Cost of one training step (forward + backward + optimizer) of ssah-peft against the alternatives.

    python benchmarks/train_step.py --size tiny --repeats 5
    python benchmarks/train_step.py --size smollm2-135m --repeats 3 --batch 4 --seq 256
    python benchmarks/train_step.py --size tiny --quant nf4          # QLoRA setting: bitsandbytes 4-bit base
    python benchmarks/train_step.py --methods protect "=LoRA" --repeats 15 --no-memory  # a focused comparison
    python benchmarks/train_step.py --size 1b --dtype bfloat16 --device cuda --batch 8 --seq 512    # on a GPU
    python benchmarks/train_step.py --size 7b --quant nf4 --dtype bfloat16 --device cuda --batch 4 --seq 512 \
        --gradient-checkpointing --methods "=LoRA" protect "select 20%"                            # QLoRA, 7B
    python benchmarks/train_step.py ... --methods "select 20%" --delta-dtype bfloat16 --optimizer adamw8bit
    python benchmarks/train_step.py --size tiny --quant nf4 --verify-build   # the NF4 base equals from_pretrained's

Every method trains the same random Llama-shaped model (random weights cost the same as real ones). The base is
built once, directly on the device (``from_config`` under ``torch.device(device)``; for ``--quant nf4`` every
projection is then quantized there to a bitsandbytes ``Linear4bit``, NF4 with double quantization, exactly what
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` makes of the same weights: ``--verify-build``
checks this), and every method gets its own copy of the module tree that shares the base's weight tensors, so
the base is in memory once and no checkpoint is written or read. ``--gradient-checkpointing`` prepares the base
as ``prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)`` does (reentrant checkpointing, the
input embeddings' output requiring grad); on an unquantized base it does the same without the fp32 casts.
``--delta-dtype`` sets ``SSAHConfig.delta_dtype`` of the SSAH methods, ``--optimizer`` the optimizer of every
trained method (bitsandbytes' ``AdamW8bit`` / ``PagedAdamW8bit``; LR 1e-5).

Step times are measured in ONE process, methods interleaved within each repeat, and reported as medians and as
ratios to LoRA r=16 measured side by side (also paired: each sample over LoRA's sample of the same repeat, so slow
drifts of a shared machine cancel). Peak memory of two training steps (the adapters' creation included): on CUDA
``max_memory_allocated`` in this process, one method at a time after the timings (exact, whatever was freed
before; a paged optimizer's state lives in managed memory and is not counted); on CPU the resident set size
(sampled every 2 ms), each method in a fresh subprocess so one method's freed memory cannot hide another's.
"peak MiB" is above the loaded base, "total peak MiB" includes it. The "floor" is the same model with everything
frozen but the input embeddings' output requiring grad: forward plus activation backward, no parameter update.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from memory import current_rss, peak_rss_above_start  # benchmarks/memory.py (the script's folder is on sys.path)
from peft import ShiraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from ssah_peft import SSAHConfig, disable_cpu_4bit_repacking
from ssah_peft.experiments.methods import lora_config, protect_config, select_config
from ssah_peft.tuner.config import DELTA_DTYPES

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")

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
    gradient_checkpointing: bool = False
    delta_dtype: str | None = None  # SSAHConfig.delta_dtype of the SSAH methods; None: the config's default
    optimizer: str = "adamw"

    def model_config(self) -> Any:
        return AutoConfig.for_model("llama", tie_word_embeddings=True, **SIZES[self.size])

    def describe(self) -> str:
        return (
            f"size={self.size} dtype={str(self.dtype).removeprefix('torch.')} quant={self.quant} "
            f"device={self.device} batch={self.batch}x{self.seq} "
            f"gradient_checkpointing={'on' if self.gradient_checkpointing else 'off'} "
            f"delta_dtype={self.delta_dtype or 'default'} optimizer={self.optimizer}"
        )

    def arguments(self) -> list[str]:
        """The command-line options that rebuild this setup (for the per-method memory subprocesses)."""
        options = [
            "--size",
            self.size,
            "--dtype",
            str(self.dtype).removeprefix("torch."),
            "--quant",
            self.quant,
            "--device",
            self.device,
            "--batch",
            str(self.batch),
            "--seq",
            str(self.seq),
            "--optimizer",
            self.optimizer,
        ]
        if self.gradient_checkpointing:
            options.append("--gradient-checkpointing")
        if self.delta_dtype:
            options += ["--delta-dtype", self.delta_dtype]
        return options


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


def method_table(config: Any, delta_dtype: str | None = None) -> dict[str, Callable[[], Any] | None]:
    """Method name → the peft config (None: full fine-tuning or the frozen floor). LoRA, select and protect are
    built as the experiments' method table builds them (``ssah_peft.experiments.methods``), on random units;
    ``delta_dtype`` (if given) is set on the SSAH configs."""
    equal = lora_equal_fraction(config)

    def ssah(make: Callable[[], SSAHConfig]) -> Callable[[], SSAHConfig]:
        if delta_dtype is None:
            return make
        return lambda: dataclasses.replace(make(), delta_dtype=delta_dtype)  # replace() validates it again

    return {
        "floor": None,
        "full": None,
        **{f"lora r={r}": (lambda r=r: lora_config(rank=r)) for r in (8, 16, 64)},
        "shira r=16": lambda: ShiraConfig(r=16, target_modules=PROJECTIONS),
        **{
            f"ssah select {round(f * 100)}%": ssah(lambda f=f: select_config(random_units(config, f)))
            for f in (0.01, 0.05, 0.20)
        },
        f"ssah select {equal * 100:.1f}% (=LoRA r16 params)": ssah(lambda: select_config(random_units(config, equal))),
        "ssah protect r=16 (7.5% units)": ssah(lambda: protect_config(random_units(config, 0.075), rank=16)),
    }


# ----------------------------------------------------------------------------------------------------------------
# The base model, built on the device
# ----------------------------------------------------------------------------------------------------------------


def nf4_config(setup: Setup) -> BitsAndBytesConfig:
    """The QLoRA quantization: NF4, double quantization, compute in ``--dtype``."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=setup.dtype,
    )


def random_model(setup: Setup, seed: int = 0) -> torch.nn.Module:
    """The random-weight Llama in ``setup.dtype``, initialized directly on ``setup.device`` (transformers' init)."""
    torch.manual_seed(seed)
    with torch.device(setup.device):
        return AutoModelForCausalLM.from_config(setup.model_config(), dtype=setup.dtype)


def quantize_nf4_(model: torch.nn.Module, setup: Setup) -> torch.nn.Module:
    """Replace every ``nn.Linear`` but the output head by a bitsandbytes NF4 ``Linear4bit`` quantized from its
    current weight, on that weight's device, one layer at a time; mark the model as transformers marks a model
    loaded with :func:`nf4_config` (what peft's LoRA dispatch and ``prepare_model_for_kbit_training`` read)."""
    import bitsandbytes as bnb

    quantization = nf4_config(setup)
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear and module is not head]
    for name in names:  # by name: each dense weight is freed as soon as its layer is replaced
        module = model.get_submodule(name)
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                module.bias is not None,
                quantization.bnb_4bit_compute_dtype,
                compress_statistics=quantization.bnb_4bit_use_double_quant,
                quant_type=quantization.bnb_4bit_quant_type,
                quant_storage=quantization.bnb_4bit_quant_storage,
            )
        weight = module.weight.data
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **layer.weight.__dict__).to(weight.device)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        layer.source_cls = torch.nn.Linear
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
        del module, weight
    model.is_quantized = True
    model.is_loaded_in_4bit = True
    model.quantization_method = quantization.quant_method
    model.config.quantization_config = quantization
    model.config._is_quantized = True
    if not setup.device.startswith("cuda"):
        disable_cpu_4bit_repacking(model)  # as ssah-peft's loaders do: keep the standard 4-bit layout on CPU
    return model


def prepare_base(model: torch.nn.Module, setup: Setup) -> torch.nn.Module:
    """Freeze the base and, for NF4, ``prepare_model_for_kbit_training``; with ``--gradient-checkpointing`` the
    same (reentrant) checkpointing on either base, with the input embeddings' output requiring grad."""
    checkpointing = {"use_reentrant": True}  # what prepare_model_for_kbit_training gets from torch by default
    if setup.quant == "nf4":
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=setup.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing,
        )
    model.requires_grad_(False)
    if setup.gradient_checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5.2x renames it; the old name still works
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    return model


def build_base(setup: Setup) -> torch.nn.Module:
    """The base every method trains on, built on ``setup.device`` without any checkpoint."""
    model = random_model(setup)
    if setup.quant == "nf4":
        quantize_nf4_(model, setup)
    return prepare_base(model, setup)


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``base``'s module tree whose parameters, buffers and 4-bit quantization states ARE the base's
    (no tensor memory but the modules'): each method wraps its own copy, the weights are in memory once."""
    memo: dict[int, Any] = {id(t): t for t in (*base.parameters(), *base.buffers())}
    for module in base.modules():
        state = getattr(module, "quant_state", None)
        if state is not None:
            memo[id(state)] = state
    return copy.deepcopy(base, memo)


def verify_nf4_build(setup: Setup) -> str:
    """Check that :func:`quantize_nf4_` makes of a model's weights what ``from_pretrained`` with
    :func:`nf4_config` makes of the same weights saved: module types, packed weights, quantization states, the
    other parameters and the logits all equal. Raises AssertionError otherwise."""
    model = random_model(setup)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        reference = AutoModelForCausalLM.from_pretrained(
            scratch, quantization_config=nf4_config(setup), device_map=setup.device, dtype=setup.dtype
        )
    if not setup.device.startswith("cuda"):
        disable_cpu_4bit_repacking(reference)
    quantize_nf4_(model, setup)
    built, loaded = dict(model.named_modules()), dict(reference.named_modules())
    assert built.keys() == loaded.keys(), sorted(built.keys() ^ loaded.keys())
    quantized = 0
    for name, module in built.items():
        assert type(module) is type(loaded[name]), (name, type(module), type(loaded[name]))
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        other = getattr(getattr(loaded[name], "weight", None), "quant_state", None)
        if state is not None:
            quantized += 1
            assert other is not None, name
            mine, theirs = state.as_dict(packed=True), other.as_dict(packed=True)
            assert mine.keys() == theirs.keys(), (name, mine.keys() ^ theirs.keys())
            for key, value in mine.items():
                same = torch.equal(value, theirs[key]) if torch.is_tensor(value) else value == theirs[key]
                assert same, (name, key)
    params, reference_params = dict(model.named_parameters()), dict(reference.named_parameters())
    assert params.keys() == reference_params.keys(), sorted(params.keys() ^ reference_params.keys())
    for key, tensor in params.items():
        other = reference_params[key]
        assert tensor.dtype == other.dtype and tensor.device == other.device, (key, tensor.dtype, other.dtype)
        assert torch.equal(tensor, other), key
    # buffers (rotary frequencies) are computed at init, not loaded: the same up to where they were computed
    buffers, reference_buffers = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == reference_buffers.keys(), sorted(buffers.keys() ^ reference_buffers.keys())
    unequal = [key for key, tensor in buffers.items() if not torch.equal(tensor, reference_buffers[key])]
    for key in unequal:
        torch.testing.assert_close(buffers[key], reference_buffers[key], rtol=1e-6, atol=0)
        buffers[key].copy_(reference_buffers[key])  # so that the logits below compare the weights alone
    for flag in ("is_loaded_in_4bit", "is_quantized", "quantization_method"):
        assert getattr(model, flag, None) == getattr(reference, flag, None), flag
    batch = torch.randint(0, model.config.vocab_size, (2, 16), device=setup.device)
    with torch.no_grad():  # train mode: bitsandbytes' CPU eval path would repack the weights
        logits, reference_logits = model.train()(batch).logits, reference.train()(batch).logits
    assert torch.equal(logits, reference_logits), (logits - reference_logits).abs().max()
    return (
        f"verified ({setup.describe()}): {quantized} NF4 layers, {len(params)} parameters and the logits equal "
        f"from_pretrained's from the same weights; buffers {'equal' if not unequal else f'within 1e-6: {unequal}'}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def make_optimizer(kind: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-5)
    import bitsandbytes as bnb

    optimizers = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}
    return optimizers[kind](params, lr=1e-5)


def prepare(
    name: str, make_config: Callable[[], Any] | None, base: torch.nn.Module, optimizer: str = "adamw"
) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """The model to train (in train mode) and its optimizer (None for the floor). ``base`` is changed: pass a
    :func:`shared_copy` (or, for full fine-tuning, a real copy) unless it is not used again."""
    if name == "floor":
        base.requires_grad_(False)
        base.enable_input_require_grads()
        model = base
    elif name == "full":
        base.requires_grad_(True)
        model = base
    else:
        model = get_peft_model(base, make_config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, (make_optimizer(optimizer, params) if params else None)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def on_cuda(setup: Setup) -> bool:
    return setup.device.startswith("cuda")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    return sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )


def random_batch(setup: Setup, config: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (setup.batch, setup.seq), generator=generator).to(setup.device)


def measure_memory(setup: Setup, name: str, steps: int = 2) -> tuple[int, int]:
    """(peak above the loaded base, total peak) in bytes of training ``name`` on a CPU, in a fresh process."""
    config = setup.model_config()
    make_config = method_table(config, setup.delta_dtype)[name]
    base = build_base(setup)
    batch = random_batch(setup, config)
    gc.collect()

    def train() -> None:
        torch.manual_seed(0)
        model, optimizer = prepare(name, make_config, base, setup.optimizer)
        for _ in range(steps):
            train_step(model, optimizer, batch)

    start = current_rss()
    above = peak_rss_above_start(train)[1]
    return above, start + above


def cuda_memory(
    setup: Setup, base: torch.nn.Module, methods: dict[str, Any], batch: torch.Tensor, steps: int = 2
) -> dict[str, tuple[int, int]]:
    """name → (peak above the base, total peak) in bytes, each method alone on ``base`` in this process (full
    fine-tuning last, on the base itself, since it changes it)."""
    peaks = {}
    for name in sorted(methods, key=lambda name: name == "full"):
        gc.collect()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model, optimizer = prepare(name, methods[name], base if name == "full" else shared_copy(base), setup.optimizer)
        for _ in range(steps):
            train_step(model, optimizer, batch)
        torch.cuda.synchronize()
        total = torch.cuda.max_memory_allocated()
        peaks[name] = (total - start, total)
        del model, optimizer
        gc.collect()
        left = torch.cuda.memory_allocated() - start
        if left > 2**20:
            print(f"warning: {name} left {left / 2**20:.0f} MiB allocated; later peaks may be overstated")
    return peaks


def run(setup: Setup, repeats: int, memory: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Rows of the comparison, and facts about the run (base memory, build time)."""
    config = setup.model_config()
    methods = method_table(config, setup.delta_dtype)
    if only:  # the reference (LoRA r=16) and the floor are always measured: every ratio needs them
        keep = [name for name in methods if name in ("floor", "lora r=16") or any(s in name for s in only)]
        methods = {name: methods[name] for name in keep}
    if setup.quant == "nf4":
        # full fine-tuning of a 4-bit base is not possible; peft's SHiRA cannot wrap Linear4bit
        methods = {k: v for k, v in methods.items() if k not in ("full", "shira r=16")}
    cuda = on_cuda(setup)
    started = time.perf_counter()
    base = build_base(setup)
    synchronize(setup.device)
    facts: dict[str, Any] = {"build_s": time.perf_counter() - started}
    if cuda:
        facts["base_memory_bytes"] = torch.cuda.memory_allocated()
        facts["device_name"] = torch.cuda.get_device_name()
    batch = random_batch(setup, config)
    prepared = {}
    for name, make_config in methods.items():
        torch.manual_seed(0)
        own = copy.deepcopy(base) if name == "full" else shared_copy(base)  # full fine-tuning changes the weights
        prepared[name] = model, optimizer = prepare(name, make_config, own, setup.optimizer)
        train_step(model, optimizer, batch)  # warm-up, and creates the optimizer state
    del own
    synchronize(setup.device)
    facts["prepare_s"] = time.perf_counter() - started - facts["build_s"]
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
    del prepared, model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    facts["timing_s"] = time.perf_counter() - started - facts["build_s"] - facts["prepare_s"]
    if memory:
        if cuda:
            peaks = cuda_memory(setup, base, methods, batch)
        else:
            del base
            gc.collect()
            peaks = {row["method"]: memory_in_subprocess(setup, row["method"]) for row in rows}
        for row in rows:
            row["peak_memory_bytes"], row["total_peak_memory_bytes"] = peaks[row["method"]]
        floor_peak = next(row["peak_memory_bytes"] for row in rows if row["method"] == "floor")
        for row in rows:
            if row["trainable_params"]:
                above_floor = row["peak_memory_bytes"] - floor_peak
                row["bytes_per_trainable_param_above_floor"] = above_floor / row["trainable_params"]
    facts["wall_s"] = time.perf_counter() - started
    return {"rows": rows, **facts}


def memory_in_subprocess(setup: Setup, name: str) -> tuple[int, int]:
    command = [sys.executable, __file__, *setup.arguments(), "--memory-of", name]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    above, total = done.stdout.strip().splitlines()[-1].split()
    return int(above), int(total)


def report(setup: Setup, rows: list[dict[str, Any]]) -> str:
    by_name = {row["method"]: row for row in rows}
    lora, floor = by_name["lora r=16"], by_name["floor"]
    lines = [
        setup.describe(),
        "",
        "| method | trainable params | optimizer state MiB | step s (median) | step / LoRA r16 | step / LoRA r16"
        " (paired) | overhead above floor s | overhead / LoRA's | peak MiB | peak / LoRA r16 | total peak MiB"
        " | above floor B/param |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lora_overhead = lora["step_s_median"] - floor["step_s_median"]
    for row in rows:
        overhead = row["step_s_median"] - floor["step_s_median"]
        peak = row.get("peak_memory_bytes")
        if peak is None:
            peak_cells = "- | - | - | -"
        else:
            per_param = row.get("bytes_per_trainable_param_above_floor")
            ratio = peak / lora["peak_memory_bytes"] if lora["peak_memory_bytes"] else float("nan")
            peak_cells = (
                f"{peak / 2**20:.0f} | {ratio:.2f} | "
                f"{row['total_peak_memory_bytes'] / 2**20:.0f} | {'-' if per_param is None else f'{per_param:.2f}'}"
            )
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
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="reentrant gradient checkpointing, as prepare_model_for_kbit_training(use_gradient_checkpointing=True)",
    )
    parser.add_argument("--delta-dtype", choices=DELTA_DTYPES, help="SSAHConfig.delta_dtype of the SSAH methods")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="of every trained method")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory measurements")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the ratios to LoRA r=16 here")
    parser.add_argument(
        "--verify-build",
        action="store_true",
        help="only check that the NF4 base built on the device equals from_pretrained's (use a small --size)",
    )
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup = Setup(
        args.size,
        getattr(torch, args.dtype),
        args.quant,
        args.device,
        args.batch,
        args.seq,
        args.gradient_checkpointing,
        args.delta_dtype,
        args.optimizer,
    )
    if args.memory_of:
        print(*measure_memory(setup, args.memory_of))
        return
    if args.verify_build:
        if setup.quant != "nf4":
            parser.error("--verify-build checks the NF4 base: add --quant nf4")
        print(verify_nf4_build(setup))
        return
    result = run(setup, args.repeats, not args.no_memory, args.methods)
    table = report(setup, result["rows"])
    print(table)
    facts = {key: value for key, value in result.items() if key != "rows"}
    print(
        " ".join(f"{key}={value:.1f}" if isinstance(value, float) else f"{key}={value}" for key, value in facts.items())
    )
    if args.out:
        args.out.write_text(json.dumps({"setup": setup.describe(), **result, "table": table}, indent=2))
    if args.plot:
        print(f"wrote {plot(setup, result['rows'], args.plot)}")


if __name__ == "__main__":
    main()
