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
* :mod:`.margin`: teacher-forced measures without generation: the refusal margin, selectivity and task loss;
* :mod:`.audit`: what the keyword judge's attack successes are: task-format, degenerate or other replies;
* :mod:`.intervals`: 95% Wilson intervals of rates and mean ± sd over seeds;
* :mod:`.statistics`: paired permutation tests and bootstrap intervals over prompts and seeds, Holm's
  correction, curves read at a matched task loss and Spearman's rank correlation;
* :mod:`.report`: the report schema, its Markdown summary and the ``report.json`` / ``generations.jsonl`` writers.

Everything public is importable from ``ssah_peft.evaluate`` itself.
"""

from .answers import exact_match, extract_answer
from .audit import REPLY_KINDS, audit_replies, is_degenerate, is_task_format, reply_kind
from .generation import GenerationSettings, generate_responses, perplexity
from .intervals import CONFIDENCE, format_rate, mean_sd, wilson_interval
from .judges import REFUSAL_PHRASES, HFJudge, Judge, KeywordJudge, is_refusal, judge_name
from .margin import (
    COMPLIANCE_OPENINGS,
    REFUSAL_OPENINGS,
    MarginBatch,
    margin_inputs,
    opening_log_probs,
    refusal_margin_terms,
    refusal_margins,
    selectivity,
    task_loss,
)
from .report import REPORT_SCHEMA, report_markdown, write_generations, write_report
from .statistics import (
    BootstrapInterval,
    PermutationTest,
    PredictionTTest,
    holm_adjust,
    interpolate_at,
    matched_range,
    paired_bootstrap_interval,
    paired_permutation_test,
    prediction_t_test,
    rank_p_value,
    spearman_correlation,
    student_t_cdf,
    two_sample_permutation_test,
    two_sample_shift_interval,
)
from .suites import SUITES, evaluate_safety, evaluate_utility, generate_together, run_evaluation

__all__ = [
    "COMPLIANCE_OPENINGS",
    "CONFIDENCE",
    "REFUSAL_OPENINGS",
    "REFUSAL_PHRASES",
    "REPLY_KINDS",
    "REPORT_SCHEMA",
    "SUITES",
    "BootstrapInterval",
    "GenerationSettings",
    "HFJudge",
    "Judge",
    "KeywordJudge",
    "MarginBatch",
    "PermutationTest",
    "PredictionTTest",
    "audit_replies",
    "evaluate_safety",
    "evaluate_utility",
    "exact_match",
    "extract_answer",
    "format_rate",
    "generate_responses",
    "generate_together",
    "holm_adjust",
    "interpolate_at",
    "is_degenerate",
    "is_refusal",
    "is_task_format",
    "judge_name",
    "margin_inputs",
    "matched_range",
    "mean_sd",
    "opening_log_probs",
    "paired_bootstrap_interval",
    "paired_permutation_test",
    "prediction_t_test",
    "rank_p_value",
    "perplexity",
    "refusal_margin_terms",
    "refusal_margins",
    "reply_kind",
    "report_markdown",
    "run_evaluation",
    "selectivity",
    "spearman_correlation",
    "student_t_cdf",
    "task_loss",
    "two_sample_permutation_test",
    "two_sample_shift_interval",
    "wilson_interval",
    "write_generations",
    "write_report",
]
