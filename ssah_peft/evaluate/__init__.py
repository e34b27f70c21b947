"""Safety and utility evaluation of a chat model, plain transformers or peft-wrapped.

The SSAH claims are about a trade-off: fine-tuning (or pruning units) should keep the model refusing harmful
requests (attack success rate, ASR), keep it answering benign requests that merely look sensitive
(over-refusal rate), and keep or improve its usefulness (task exact-match accuracy, perplexity). This package
measures all four on the built-in sets (:mod:`ssah_peft.data`) or on any records with a ``prompt``, one concept
per module:

* :mod:`.judges`: safety verdicts, from refusal keywords by default or from a judge (any callable
  ``(prompt, response) -> bool``, or :class:`HFJudge` around a Hugging Face classifier or causal-LM judge);
* :mod:`.generation`: greedy chat responses and the perplexity of reference responses;
* :mod:`.answers`: the answer a generation gives and exact match against the reference;
* :mod:`.suites`: the safety and utility suites and :func:`run_evaluation`, which builds the report;
* :mod:`.intervals`: 95% Wilson intervals of rates and mean ± sd over seeds;
* :mod:`.report`: the report schema, its Markdown summary and the ``report.json`` / ``generations.jsonl`` writers.

Everything public is importable from ``ssah_peft.evaluate`` itself.
"""

from .answers import exact_match, extract_answer
from .generation import GenerationSettings, generate_responses, perplexity
from .intervals import CONFIDENCE, format_rate, mean_sd, wilson_interval
from .judges import REFUSAL_PHRASES, HFJudge, Judge, KeywordJudge, is_refusal, judge_name
from .report import REPORT_SCHEMA, report_markdown, write_generations, write_report
from .suites import SUITES, evaluate_safety, evaluate_utility, generate_together, run_evaluation

__all__ = [
    "CONFIDENCE",
    "REFUSAL_PHRASES",
    "REPORT_SCHEMA",
    "SUITES",
    "GenerationSettings",
    "HFJudge",
    "Judge",
    "KeywordJudge",
    "evaluate_safety",
    "evaluate_utility",
    "generate_together",
    "exact_match",
    "extract_answer",
    "format_rate",
    "generate_responses",
    "is_refusal",
    "judge_name",
    "mean_sd",
    "perplexity",
    "report_markdown",
    "run_evaluation",
    "wilson_interval",
    "write_generations",
    "write_report",
]
