"""The evaluation suites: which sets are measured, how verdicts become rates, and the whole report run.

The SSAH claims are about a trade-off, so a suite measures both sides on the same settings: ``safety`` (attack
success rate on harmful prompts, over-refusal rate on benign sensitive-looking ones) and ``utility`` (task
exact-match accuracy, perplexity of reference responses). This module chooses the data sets and judges, counts
the verdicts per category and assembles the report; the model passes, judges, answer matching and report format
are in their own modules (:mod:`.generation`, :mod:`.judges`, :mod:`.answers`, :mod:`.report`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import PreTrainedTokenizerBase

from ..data import load_builtin
from .answers import exact_match, extract_answer
from .generation import GenerationSettings, generate_responses, perplexity
from .judges import Judge, KeywordJudge, judge_name
from .report import REPORT_SCHEMA, environment, write_report

SUITES = ("safety", "utility", "all")


def _limited(records: Iterable[Mapping[str, Any]], limit: Optional[int]) -> list[dict[str, Any]]:
    rows = [dict(r) for r in records][:limit]
    if not rows:
        raise ValueError("No records to evaluate (an empty data set, or limit=0).")
    return rows


def _rate(rows: list[dict[str, Any]], flag: str, count_key: str, rate_key: str) -> dict[str, Any]:
    hits = sum(bool(r[flag]) for r in rows)
    return {"n": len(rows), count_key: hits, rate_key: hits / len(rows)}


def _rate_block(rows: list[dict[str, Any]], flag: str, count_key: str, rate_key: str) -> dict[str, Any]:
    """Count and rate of ``flag`` over all rows and per category."""
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_category[str(r.get("category") or "")].append(r)
    return {
        **_rate(rows, flag, count_key, rate_key),
        "by_category": {c: _rate(group, flag, count_key, rate_key) for c, group in sorted(by_category.items())},
    }


def _generations(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    rows: list[dict[str, Any]],
    settings: GenerationSettings,
    responses: Optional[Mapping[str, str]] = None,
) -> list[dict[str, Any]]:
    """The ``generations.jsonl`` records of ``rows``, their greedy responses included; the suite adds its verdict.

    ``responses`` (prompt -> greedy response) holds responses generated beforehand, e.g. for several sets in one
    batched call (:func:`generate_together`); only prompts missing from it are generated here.
    """
    prompts = [r["prompt"] for r in rows]
    given = dict(responses or {})
    missing = [p for p in dict.fromkeys(prompts) if p not in given]
    if missing:
        given.update(zip(missing, generate_responses(model, tokenizer, missing, settings, desc=dataset)))
    responses = [given[p] for p in prompts]
    return [
        {"dataset": dataset, "prompt": r["prompt"], "category": r.get("category"), "response": response}
        for r, response in zip(rows, responses)
    ]


def generate_together(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sets: Iterable[Iterable[Mapping[str, Any]]],
    settings: GenerationSettings,
) -> dict[str, str]:
    """Greedy responses to the prompts of several sets in one :func:`generate_responses` call (prompt -> response),
    for the ``responses`` argument of :func:`evaluate_safety` and :func:`evaluate_utility`.

    With a ``settings.batch_size`` that holds them all, every decoding step serves all sets at once; on 2 CPU
    cores the demo's 36 + 18 + 36 prompts take about 14 s together against 17 s one set at a time. A left-padded
    sequence's greedy tokens do not depend on the other prompts of its batch but through float rounding (the
    demo's base model gave the same 90 responses both ways).
    """
    prompts = list(dict.fromkeys(str(r["prompt"]) for records in sets for r in records))
    return dict(zip(prompts, generate_responses(model, tokenizer, prompts, settings, desc="generating")))


def evaluate_safety(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Optional[Iterable[Mapping[str, Any]]] = None,
    benign: Optional[Iterable[Mapping[str, Any]]] = None,
    settings: Optional[GenerationSettings] = None,
    harm_judge: Optional[Judge] = None,
    refusal_judge: Optional[Judge] = None,
    limit: Optional[int] = None,
    responses: Optional[Mapping[str, str]] = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Attack success rate on ``harmful`` prompts and over-refusal rate on ``benign`` sensitive-looking ones.

    Defaults: the built-in ``harmful_eval`` and ``overrefusal_eval`` sets and keyword judges. ``harm_judge``
    decides attack success on harmful prompts; ``refusal_judge`` decides refusal on benign prompts (a harm
    judge cannot tell an over-refusal). ``responses``: responses already generated (:func:`generate_together`);
    a block's ``seconds`` then counts only what is still generated and judged. Returns the report's ``safety``
    block and the generation records.
    """
    settings = settings or GenerationSettings()
    harm_judge = harm_judge or KeywordJudge(harmful=True)
    refusal_judge = refusal_judge or KeywordJudge()
    named = (
        ("harmful", "harmful_eval", harmful, harm_judge, "harmful", "attack_successes", "asr"),
        ("overrefusal", "overrefusal_eval", benign, refusal_judge, "refused", "refusals", "rate"),
    )
    block: dict[str, Any] = {}
    generations: list[dict[str, Any]] = []
    for key, builtin, records, judge, flag, count_key, rate_key in named:
        start = time.perf_counter()
        dataset = builtin if records is None else key
        rows = _limited(load_builtin(builtin) if records is None else records, limit)
        judged = _generations(model, tokenizer, dataset, rows, settings, responses)
        for record in judged:
            record[flag] = bool(judge(record["prompt"], record["response"]))
        block[key] = {
            "dataset": dataset,
            **_rate_block(judged, flag, count_key, rate_key),
            "seconds": round(time.perf_counter() - start, 2),
        }
        generations.extend(judged)
    return block, generations


def evaluate_utility(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Optional[Iterable[Mapping[str, Any]]] = None,
    perplexity_sets: Optional[Mapping[str, Iterable[Mapping[str, Any]]]] = None,
    settings: Optional[GenerationSettings] = None,
    limit: Optional[int] = None,
    responses: Optional[Mapping[str, str]] = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Exact-match accuracy on ``task`` (records with prompt and answer) and perplexity of reference responses.

    Defaults: the built-in ``task_test`` set, and perplexity on the ``utility_calibration`` responses
    (general instructions: what fine-tuning must not damage) and the ``task_test`` responses (the
    fine-tuning task itself). ``responses`` as in :func:`evaluate_safety`. Returns the report's ``utility`` block
    and the generation records.
    """
    settings = settings or GenerationSettings()
    start = time.perf_counter()
    dataset = "task_test" if task is None else "task"
    rows = _limited(load_builtin("task_test") if task is None else task, limit)
    generations = _generations(model, tokenizer, dataset, rows, settings, responses)
    for record, r in zip(generations, rows):
        response = record["response"]
        record.update(
            answer=r["answer"], extracted=extract_answer(response), correct=exact_match(response, str(r["answer"]))
        )
    correct = sum(g["correct"] for g in generations)
    block: dict[str, Any] = {
        "task": {
            "dataset": dataset,
            "n": len(rows),
            "correct": correct,
            "accuracy": correct / len(rows),
            "seconds": round(time.perf_counter() - start, 2),
        },
        "perplexity": {},
    }
    if perplexity_sets is None:
        perplexity_sets = {name: load_builtin(name) for name in ("utility_calibration", "task_test")}
    for name, records in perplexity_sets.items():
        start = time.perf_counter()
        result = perplexity(
            model,
            tokenizer,
            _limited(records, limit),
            batch_size=settings.batch_size,
            system_prompt=settings.system_prompt,
            show_progress=settings.show_progress,
        )
        block["perplexity"][name] = {**result, "seconds": round(time.perf_counter() - start, 2)}
    return block, generations


def run_evaluation(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    suite: str = "all",
    model_name: Optional[str] = None,
    adapter: Optional[str] = None,
    settings: Optional[GenerationSettings] = None,
    harm_judge: Optional[Judge] = None,
    refusal_judge: Optional[Judge] = None,
    limit: Optional[int] = None,
    out_dir: Optional[Union[str, Path]] = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the ``"safety"``, ``"utility"`` or ``"all"`` suites on the built-in sets and build the report.

    ``limit`` keeps the first N records of every set (for quick checks). With ``out_dir`` the report,
    its Markdown table and the generations are written there (see :func:`~ssah_peft.evaluate.write_report`).
    Returns the report (schema in :mod:`ssah_peft.evaluate.report`) and the generation records.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    settings = settings or GenerationSettings()
    harm_judge = harm_judge or KeywordJudge(harmful=True)
    refusal_judge = refusal_judge or KeywordJudge()
    suites = ["safety", "utility"] if suite == "all" else [suite]
    start = time.perf_counter()
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_name or str(getattr(model, "name_or_path", "") or type(model).__name__),
        "adapter": adapter,
        "suites": suites,
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k != "show_progress"},
            "limit": limit,
            "harm_judge": judge_name(harm_judge),
            "refusal_judge": judge_name(refusal_judge),
        },
        "environment": environment(model),
    }
    generations: list[dict[str, Any]] = []
    if "safety" in suites:
        report["safety"], records = evaluate_safety(
            model, tokenizer, settings=settings, harm_judge=harm_judge, refusal_judge=refusal_judge, limit=limit
        )
        generations.extend(records)
    if "utility" in suites:
        report["utility"], records = evaluate_utility(model, tokenizer, settings=settings, limit=limit)
        generations.extend(records)
    report["seconds"] = round(time.perf_counter() - start, 2)
    if out_dir is not None:
        write_report(report, generations, out_dir)
    return report, generations
