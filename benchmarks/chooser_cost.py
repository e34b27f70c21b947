"""What each frontier chooser's unit map costs to compute (issue 26: "what each selector costs"), side by side.

Makes every map of ``ssah_peft.experiments.chooser_maps.UNIT_MAPS`` from the demo's aligned model with the sweep's
own recipe (calibration prompts, classification; ``conflict`` from the task attack's records), nothing cached, one
after the other in one process, and times each. Beside them, in the same run, a plain no-grad forward of the aligned
model over the calibration exchanges every scorer reads (the safety and the utility set), the unit the ratios are
given in, and the time to load a fresh copy of the model (a recipe loads one, or two for ``alignment_delta``; it is
part of each map's time, as it is of a sweep's).

    python benchmarks/chooser_cost.py --threads 2          # the demo's aligned model (make demo)
    python benchmarks/chooser_cost.py --quick --demo runs/demo-quick --results /tmp/cost   # smoke test

Writes ``--results/chooser_costs.json``; ``benchmarks/frontier_v2.py`` puts its table into ``summary.md``. A map
derived from another (``variance_std`` from ``variance``) costs only the derivation when that one is made first.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ssah_peft import build_calibration_batches
from ssah_peft._files import write_text
from ssah_peft.cli.options import comma_list
from ssah_peft.experiments import DemoConfig
from ssah_peft.experiments.chooser_maps import DEMO_ALIGNED_MODEL, UNIT_MAPS, UnitMaps, missing_demo_outputs
from ssah_peft.experiments.frontier_curves import CHOOSER_COSTS_FILE
from ssah_peft.experiments.measures import demo_calibration_set
from ssah_peft.models import load


def timed(make, *args) -> tuple[object, float]:
    """``make(*args)`` and the seconds it took."""
    start = time.perf_counter()
    value = make(*args)
    return value, time.perf_counter() - start


def plain_forward_seconds(model, tokenizer, config: DemoConfig) -> float:
    """One no-grad forward over the safety and the utility calibration exchanges, batched as the scorers batch; the
    faster of two, so that the first call's one-time setup is not counted."""
    batches = [
        batch
        for name in ("safety_calibration", "utility_calibration")
        for batch in build_calibration_batches(tokenizer, demo_calibration_set(name, config).pairs, tokens="response")
    ]
    model.eval()
    with torch.no_grad():
        times = []
        for _ in range(2):
            start = time.perf_counter()
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo run dir with the aligned model")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/frontier_v2"))
    parser.add_argument("--maps", type=comma_list(str), default=list(UNIT_MAPS), help="the unit maps to time")
    parser.add_argument("--attack", default="task", help="the attack whose records the per-attack maps read")
    parser.add_argument("--quick", action="store_true", help="smoke test: the quick demo's sizes")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    unknown = [name for name in args.maps if name not in UNIT_MAPS]
    if unknown:
        parser.error(f"unknown maps {unknown}; known: {', '.join(UNIT_MAPS)}")
    missing = missing_demo_outputs(args.demo)
    if missing:
        parser.error(f"{', '.join(map(str, missing))} missing: run `make demo` first (stages 1-3 make them)")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = (DemoConfig.quick if args.quick else DemoConfig.full)(show_progress=False)
    aligned = args.demo / DEMO_ALIGNED_MODEL

    def load_aligned():
        return load(str(aligned), dtype=torch.float32)

    (model, tokenizer), load_seconds = timed(load_aligned)
    forward = plain_forward_seconds(model, tokenizer, config)
    del model
    maps = UnitMaps(config, load_aligned, lambda: load(config.model, dtype=torch.float32))
    seconds = {}
    for name in args.maps:
        print(f"[chooser_cost] {name}", file=sys.stderr, flush=True)
        _, seconds[name] = timed(maps.get, name, args.attack)
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "threads": torch.get_num_threads(),
        "calibration_pairs": config.calibration_pairs,
        "load_seconds": load_seconds,
        "plain_forward_seconds": forward,
        "map_seconds": seconds,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_text(args.results / CHOOSER_COSTS_FILE, json.dumps(result, indent=1) + "\n")
    for name, value in seconds.items():
        print(f"{name:>20}: {value:7.1f} s  ({value / forward:6.1f}x a plain forward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
