"""Cost of a unit-scoring pass against a plain no-grad forward over the same batches.

    python benchmarks/scoring.py --hidden 512 --layers 4
    torchrun --nproc_per_node 2 benchmarks/scoring.py --threads 1     # 2 processes (gloo on CPU)
    python benchmarks/scoring.py --size 1b --dtype bfloat16 --device cuda --batch 8 --seq 512 --batches 16 \
        --methods variance wanda --out scoring_1b.json                # on a GPU (the model is built there)

A random Llama scores random calibration batches (the real tokens after the first quarter of a row are scored).
Each repeat times, in alternating order, one plain ``model(**inputs)`` pass under ``torch.no_grad()`` over all
batches and one ``score_units`` call per method (hooks, float64 statistics, weight statistics and finalisation).
Ratios are taken per repeat against the plain forward of the same repeat and between the fastest runs, for wall
and CPU time (the latter is robust on a shared machine; run with ``--threads 1`` there). The target for
``variance`` is ≤ 1.10. SNIP needs a backward pass, so a plain forward + backward to the input embeddings is timed
too.

Under ``torchrun`` every process takes its share of the batches (``--batches`` in all), the scorer merges the
statistics of all processes, and every timed run starts and ends at a barrier, so the times are those of the
slowest process and include the merge. Tokens/s count the real tokens of all processes. Peak memory is the
resident set above the start of each run, measured once per run after the timings, in the table's order (the
allocator reuses what earlier runs freed, so it understates later runs; the scorer's own state is 3 float64
vectors per output projection).

With ``--device cuda`` the random model is initialized on the GPU (no CPU copy) and the batches are moved there
before any timing, so both runs read the same device tensors; every timed run starts and ends with a
``torch.cuda.synchronize()``, and peak memory is ``max_memory_allocated`` above the start of the run (exact, in
any order). ``--size`` takes a shape of ``train_step.py`` (``1b``: Llama-3.2-1B widths) instead of the shape
options. Under ``torchrun`` with CUDA each process uses the GPU of its LOCAL_RANK and NCCL.

``--count-ops`` times nothing: it runs one ``score_units`` pass per method and counts, with a dispatch mode around
the scorer's forward hooks (``accumulators.moment_hook``; ``snip`` is not counted), every aten operator the hooks
run, those that make a GPU wait for the host to read a value back (``nonzero``, ``_local_scalar_dense`` i.e.
``.item()``/``int()``/``bool()``, ``masked_select``, ``is_nonzero``, ``equal``, indexing with a boolean mask),
the bytes they move (every tensor argument read in full, every output written; views move nothing) and the
elements they materialize per dtype (outputs of operators that neither write in place nor return a view). These
counts are the same on any machine and are what a GPU would launch, so they stand in for a GPU timing and compare
across commits. Counted for the path this device runs and, forced, for the path a CUDA device runs
(``accumulators.batch_moments(..., one_read=True)``), with the operators a pass runs outside its forwards and
hooks (a fixed cost per pass, which a GPU pays with its device idle); one process only:

    python benchmarks/scoring.py --count-ops --dtype bfloat16 --methods variance wanda

``--check-exact`` times nothing either: it scores the batches once per method on the model's device and compares
the scores with float64 ones computed on the host from the scored rows of every output projection's input, captured
during a plain forward (variance: Var_n(X_nj)·‖W_:,j‖²; Wanda: RMS_n(X_nj)·Σ_i|W_ij|). It prints the largest
relative error per method, which on a GPU is the rounding of the device's own float32 reductions (the tests check
the CPU's). The captured rows are held in float64, so keep the shape small (the default one):

    python benchmarks/scoring.py --check-exact --device cuda --dtype bfloat16 --methods variance wanda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from dispatch_counts import OperatorCounter  # benchmarks/dispatch_counts.py (the script's folder is on sys.path)
from memory import peak_rss_above_start  # benchmarks/memory.py
from train_step import SIZES  # benchmarks/train_step.py
from transformers import AutoConfig, AutoModelForCausalLM

from ssah_peft import score_units
from ssah_peft.quantization import dense_weight
from ssah_peft.scoring import accumulators
from ssah_peft.units import resolve_architecture


def random_batches(vocab: int, batch: int, seq: int, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=generator)
        for row, length in enumerate(lengths.tolist()):
            attention_mask[row, length:] = 0
        score_mask = attention_mask.bool() & (torch.arange(seq) >= seq // 4)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "position_ids": position_ids,
                "score_mask": score_mask,
            }
        )
    return batches


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "score_mask"}


def peak_memory_above_start(work: Callable[[], object], device: str) -> int:
    """Peak memory of ``work()`` above its start, in bytes: CUDA's allocator counters, or the CPU resident set."""
    if not device.startswith("cuda"):
        return peak_rss_above_start(work)[1]
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    work()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


@contextlib.contextmanager
def counting_hooks(counter: OperatorCounter) -> Iterator[None]:
    """Make the scorer's moment hooks (registered from here on) run under ``counter``."""
    make_hook = accumulators.moment_hook

    def counted(*args: Any) -> Callable[..., None]:
        hook = make_hook(*args)

        def run(*hook_args: Any) -> None:
            counter.calls += 1
            with counter:
                hook(*hook_args)

        return run

    with mock.patch.object(accumulators, "moment_hook", counted):
        yield


def count_operators(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], methods: list[str]) -> list[str]:
    """The table of ``--count-ops``: per method and moment path, what the hooks run in one scoring pass, and what
    the pass runs besides its forwards and its hooks (once per pass, whatever the number of batches: weight
    statistics, merge, read-back, scores)."""
    batch_moments = accumulators.batch_moments
    device = batches[0]["input_ids"].device.type
    paths: dict[str, Callable[[], Any]] = {
        f"{device} (as run here)": contextlib.nullcontext,
        "one-read (CUDA)": lambda: mock.patch.object(
            accumulators, "batch_moments", lambda x, one_read: batch_moments(x, one_read=True)
        ),
    }
    forward = OperatorCounter()
    with forward, torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "score_mask"})
    lines = [
        "| method | path | hook calls | aten ops per call | synchronising ops per pass | MiB moved per call | "
        "elements made per call | ops per pass outside forwards and hooks | operators per call |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for method in methods:
        for path, patch in paths.items():
            counter, whole = OperatorCounter(), OperatorCounter()
            with patch(), counting_hooks(counter), whole:
                score_units(model, batches, method=method, show_progress_bar=False)
            calls = counter.calls
            outside = whole.operators.total() - forward.operators.total() - counter.operators.total()
            elements = ", ".join(
                f"{str(dtype).removeprefix('torch.')} {count / calls:.0f}" for dtype, count in counter.elements.items()
            )
            operators = ", ".join(
                f"{name.removeprefix('aten::')} {count / calls:g}" for name, count in counter.operators.items()
            )
            lines.append(
                f"| {method} | {path} | {calls} | {counter.operators.total() / calls:g} | "
                f"{counter.synchronising.total()} | {counter.bytes_moved / calls / 2**20:.2f} | {elements} | "
                f"{outside} | {operators} |"
            )
    return lines


def largest_relative_errors(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], methods: list[str]
) -> dict[str, float]:
    """``--check-exact``: per method, the largest relative difference between a unit's score from ``score_units``
    and its float64 score from the captured scored rows (see the module docstring)."""
    projections = list(resolve_architecture(model.config).output_projections(model))
    rows: dict[str, list[torch.Tensor]] = {name: [] for _, _, name, _ in projections}
    masks: list[torch.Tensor] = []

    def capture(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            rows[name].append(x.reshape(-1, x.shape[-1])[masks[-1].reshape(-1)].double().cpu())

        return hook

    handles = [module.register_forward_pre_hook(capture(name)) for _, _, name, module in projections]
    try:
        with torch.no_grad():
            for batch in batches:
                masks.append(batch["score_mask"].to(batch["input_ids"].device) & batch["attention_mask"].bool())
                model(**model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    errors = {}
    for method in methods:
        scores = score_units(model, batches, method=method, show_progress_bar=False)
        worst = 0.0
        for kind, layer, name, module in projections:
            x, weight = torch.cat(rows[name]), dense_weight(module).double().cpu()
            if method == "variance":
                exact = x.var(dim=0) * weight.square().sum(dim=0)
            else:
                exact = x.square().mean(dim=0).sqrt() * weight.abs().sum(dim=0)
            worst = max(worst, float(((scores[layer, kind] - exact).abs() / exact.abs()).max()))
        errors[method] = worst
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), help="a shape of train_step.py; overrides the shape options")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=["variance", "wanda", "snip"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", type=Path, help="write the table and every sample as JSON here")
    parser.add_argument("--count-ops", action="store_true", help="count what the hooks run instead of timing")
    parser.add_argument(
        "--check-exact", action="store_true", help="compare the scores with float64 ones instead of timing"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.batches < world:
        parser.error(f"--batches {args.batches} cannot be shared by {world} processes")
    if (args.count_ops or args.check_exact) and world > 1:
        parser.error("--count-ops and --check-exact run one process: run them without torchrun")
    if "snip" in args.methods and args.check_exact:
        parser.error("--check-exact compares variance and wanda scores; leave snip out of --methods")
    cuda = device.startswith("cuda")

    shape = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
    )
    if args.size:
        shape = SIZES[args.size]
    config = AutoConfig.for_model("llama", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    all_batches = random_batches(config.vocab_size, args.batch, args.seq, args.batches)
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in all_batches[rank::world]]
    if args.count_ops:
        print(
            f"llama hidden={config.hidden_size} intermediate={config.intermediate_size} "
            f"layers={config.num_hidden_layers} {args.dtype}; {args.batches} batches of {args.batch}x{args.seq}; "
            "one scoring pass per row"
        )
        print("\n".join(count_operators(model, batches, [m for m in args.methods if m != "snip"])))
        return
    if args.check_exact:
        errors = largest_relative_errors(model, batches, args.methods)
        setup = (
            f"llama hidden={config.hidden_size} intermediate={config.intermediate_size} "
            f"layers={config.num_hidden_layers} {args.dtype} on {device}; {args.batches} batches of "
            f"{args.batch}x{args.seq}; largest relative error of a unit's score against float64"
        )
        table = "\n".join([setup, "", "| method | largest relative error |", "| --- | ---: |"])
        table += "".join(f"\n| {method} | {error:.2e} |" for method, error in errors.items())
        print(table)
        if args.out:
            args.out.write_text(json.dumps({"setup": setup, "errors": errors, "table": table}, indent=2))
        return

    def plain_forward() -> None:
        with torch.no_grad():
            for batch in batches:
                model(**model_inputs(batch))

    def plain_forward_backward() -> None:
        embeddings = model.get_input_embeddings()
        for batch in batches:
            inputs = model_inputs(batch)
            embeds = embeddings(inputs.pop("input_ids")).detach().requires_grad_()
            torch.autograd.grad(model(inputs_embeds=embeds, **inputs).logits.float().logsumexp(-1).sum(), embeds)

    runs: dict[str, Callable[[], object]] = {"plain forward (no grad)": plain_forward}
    if "snip" in args.methods:
        runs["plain forward + backward"] = plain_forward_backward
    for method in args.methods:
        runs[f"score_units({method})"] = lambda method=method: score_units(
            model, batches, method=method, show_progress_bar=False
        )
    for run in runs.values():  # warm-up
        run()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            _barrier(cuda)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            _barrier(cuda)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    peak = {name: peak_memory_above_start(runs[name], device) for name in names}

    if rank == 0:
        tokens = sum(int(b["attention_mask"].sum()) for b in all_batches)
        scored = sum(int(b["score_mask"].sum()) for b in all_batches)
        where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads per process"
        lines = [
            f"llama hidden={config.hidden_size} intermediate={config.intermediate_size} "
            f"layers={config.num_hidden_layers} vocab={config.vocab_size} {args.dtype} on {device} ({where}); "
            f"{args.batches} batches of {args.batch}x{args.seq} ({tokens} real tokens, {scored} scored) over "
            f"{world} process(es); {args.repeats} interleaved repeats",
            "",
            "Ratios to the plain forward: median over repeats of the ratio within a repeat, and ratio of the "
            "minimums. CPU time (process time, process 0) is the robust figure on a shared machine; it counts "
            "spinning threads too (on a GPU it is the launching thread's time). Peak: "
            + ("CUDA max_memory_allocated" if cuda else "process 0's resident set")
            + " above the start of the run.",
            "",
            "| run | wall median s | wall ratio (paired) | wall ratio (min) | CPU median s | CPU ratio (paired) | "
            "tokens/s | peak MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        plain = "plain forward (no grad)"
        for name in names:
            lines.append(
                f"| {name} | {statistics.median(wall[name]):.3f} | {_paired(wall[name], wall[plain]):.3f} | "
                f"{min(wall[name]) / min(wall[plain]):.3f} | {statistics.median(cpu[name]):.3f} | "
                f"{_paired(cpu[name], cpu[plain]):.3f} | {tokens / statistics.median(wall[name]):.0f} | "
                f"{peak[name] / 2**20:.0f} |"
            )
        print("\n".join(lines))
        if args.out:
            runs_out = {
                name: {
                    "wall_s": wall[name],
                    "cpu_s": cpu[name],
                    "wall_ratio_paired": _paired(wall[name], wall[plain]),
                    "wall_ratio_min": min(wall[name]) / min(wall[plain]),
                    "peak_memory_bytes": peak[name],
                }
                for name in names
            }
            args.out.write_text(json.dumps({"setup": lines[0], "runs": runs_out, "table": "\n".join(lines)}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


def _barrier(cuda: bool = False) -> None:
    if cuda:
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def _paired(values: list[float], baseline: list[float]) -> float:
    return statistics.median(v / b for v, b in zip(values, baseline))


if __name__ == "__main__":
    main()
