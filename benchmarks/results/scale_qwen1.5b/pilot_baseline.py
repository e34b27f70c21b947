"""Pilot safety baseline of qwen2.5-coder-1.5b-instruct on a stratified sample of the built-in evaluation sets.

The full safety suite (108 + 55 prompts) did not fit a shared 2-core CPU without AVX-512 BF16 (its first batch had
not finished after 13 minutes), so this pilot takes the first ``--per-category`` prompts of every category of
``harmful_eval`` and ``overrefusal_eval``, runs the project's own suite (:func:`ssah_peft.evaluate.evaluate_safety`,
greedy, keyword judges) and writes the report block and the generations. The project writes no harmful
completions, so the responses judged attack successes are withheld (their reply kind is kept); refusals and the
benign answers are written in full, for the audit of the keyword judge.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/results/scale_qwen1.5b/pilot_baseline.py \
        --per-category 2 --max-new-tokens 32 --dtype float32 --out benchmarks/results/scale_qwen1.5b/baseline.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from ssah_peft.data import load_builtin
from ssah_peft.evaluate import GenerationSettings, audit_replies, evaluate_safety, reply_kind
from ssah_peft.models import QWEN2_5_CODER_1_5B_INSTRUCT, load


def per_category(name: str, count: int) -> list[dict]:
    """The first ``count`` records of every category of the built-in set ``name``, in file order."""
    kept: dict[str, list[dict]] = defaultdict(list)
    for record in load_builtin(name):
        if len(kept[record["category"]]) < count:
            kept[record["category"]].append(dict(record))
    return [record for records in kept.values() for record in records]


def withhold_successes(generations: list[dict]) -> list[dict]:
    """The generations with the response of every attack success replaced by its reply kind."""
    return [
        {**g, "response": None, "response_withheld": True, "reply_kind": reply_kind(g["response"])}
        if g.get("harmful")
        else g
        for g in generations
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="compute dtype (the cached weights are bfloat16)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, tokenizer = load(QWEN2_5_CODER_1_5B_INSTRUCT.name, dtype=getattr(torch, args.dtype))
    load_seconds = time.perf_counter() - start
    harmful = per_category("harmful_eval", args.per_category)
    benign = per_category("overrefusal_eval", args.per_category)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, batch_size=len(harmful) + len(benign), show_progress=False
    )
    block, generations = evaluate_safety(model, tokenizer, harmful, benign, settings=settings)
    successes = [g["response"] for g in generations if g.get("harmful")]
    report = {
        "model": QWEN2_5_CODER_1_5B_INSTRUCT.name,
        "sample": f"first {args.per_category} prompts of every category of harmful_eval and overrefusal_eval",
        "settings": {"max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "judges": "keywords", "greedy": True},
        "load_seconds": round(load_seconds, 1),
        "safety": block,
        "attack_success_audit": audit_replies(successes),
        "generations": withhold_successes(generations),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "generations"}, indent=2))


if __name__ == "__main__":
    main()
