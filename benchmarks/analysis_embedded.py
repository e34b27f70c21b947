"""The analyses on the embedded SmolLM2-135M-Instruct: probe verdict and ablation table, with their run times.

    python benchmarks/analysis_embedded.py --out-dir runs/analysis_embedded

Steps: load the model; probe 30 harmful prompts of the built-in ``harmful_eval`` set; score units on the first
``--calibration`` records of the built-in safety and utility calibration sets and classify them with the paper's
proportions; ablate each unit type (and a random SCU-sized control) and evaluate on the first ``--limit`` records
of each evaluation set with short greedy generations. Results go into a run directory (``probe.json``,
``ablation.json``, ``unitmap.safetensors``, ``report.md`` with figures) and the timings are printed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ssah_peft import UnitMap, build_calibration_batches, load_builtin, score_units
from ssah_peft.analysis import ablation_table, build_report, probe_reasoning_direction
from ssah_peft.evaluate import GenerationSettings
from ssah_peft.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/analysis_embedded"))
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.perf_counter()
    model, tokenizer = load("smollm2-135m-instruct")
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    prompts = [r["prompt"] for r in load_builtin("harmful_eval")][: args.prompts]
    probe = probe_reasoning_direction(model, tokenizer, prompts, show_progress=False)
    timings["probe"] = time.perf_counter() - start
    probe.save(args.out_dir / "probe.json")

    start = time.perf_counter()
    scores = {}
    for name in ("safety_calibration", "utility_calibration"):
        pairs = [(r["prompt"], r["response"]) for r in load_builtin(name)][: args.calibration]
        batches = build_calibration_batches(tokenizer, pairs, batch_size=8, max_length=256)
        scores[name] = score_units(model, batches, show_progress_bar=False)
    unit_map = UnitMap.from_scores(scores["safety_calibration"], scores["utility_calibration"])
    timings["score"] = time.perf_counter() - start
    unit_map.save(args.out_dir / "unitmap.safetensors")

    start = time.perf_counter()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=16, show_progress=False)
    table = ablation_table(model, tokenizer, unit_map, limit=args.limit, settings=settings)
    timings["ablation_table"] = time.perf_counter() - start
    table.save(args.out_dir / "ablation.json")
    report = build_report(args.out_dir)

    print(f"probe ({args.prompts} prompts, 10 appended tokens): the model {probe.verdict()}")
    preference = [round(float(x), 2) for x in probe.refusal_preference()]
    print(f"per-block fraction of prompts preferring refusal: {preference}")
    print(table.markdown())
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
