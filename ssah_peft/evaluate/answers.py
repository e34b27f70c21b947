"""Scoring a task answer: which answer a free-form generation gives, and whether it is the expected one.

Task accuracy (:func:`ssah_peft.evaluate.evaluate_utility`) compares greedy generations with reference answers;
a chat model wraps its answer in prose, markdown and thousands separators, so the comparison needs its own rules,
kept here apart from the model passes so that they can be read and tested on strings alone.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_WRAPPERS = " \t\n\"'`*_"


def _clean(text: str) -> str:
    text = text.strip().strip(_WRAPPERS).rstrip(".!").strip(_WRAPPERS)
    return re.sub(r"\s+", " ", text)


def _first_line(text: str) -> str:
    return next((_clean(line) for line in text.splitlines() if line.strip()), "")


def extract_answer(generation: str) -> str:
    """The answer a generation gives: the first line after its last "answer is", else its last number,
    else its first non-empty line (markdown emphasis, quotes and a final period removed)."""
    position = generation.casefold().rfind("answer is")
    if position >= 0:
        return _first_line(generation[position + len("answer is") :].lstrip(" :"))
    numbers = _NUMBER.findall(generation)
    if numbers:
        return numbers[-1].replace(",", "")
    return _first_line(generation)


def exact_match(generation: str, answer: str) -> bool:
    """Whether ``generation`` gives ``answer``: numerically for a numeric answer (first number of the
    extracted answer, thousands separators allowed), else as text (case-sensitive, whitespace-normalised)."""
    extracted = extract_answer(generation)
    if _NUMBER.fullmatch(answer.strip()):
        found = _NUMBER.search(extracted)
        return found is not None and float(found.group().replace(",", "")) == float(answer.replace(",", ""))
    return _clean(extracted) == _clean(answer)
