"""The records a run trains on, as SFT examples with the loss on the responses only.

A module of its own because every run trains on the same rendering of a record: the demo's runs, the benchmarks
and ``ssah-peft finetune`` all tokenize an exchange with the model's chat template
(:func:`ssah_peft.chat.tokenize_conversation`) and label only its assistant tokens, so a loss or a unit count means the
same thing in each. :func:`spread` picks the subsets they evaluate and calibrate on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..chat import record_messages, tokenize_conversation

#: The label of a token that is not trained on (prompt, padding): ignored by the cross-entropy.
IGNORED = -100


def spread(records: Sequence[Mapping[str, Any]], count: int) -> list[dict[str, Any]]:
    """``count`` records evenly spaced over ``records``: the built-in sets are ordered by category, so a prefix
    would cover only the first categories."""
    count = min(count, len(records))
    return [dict(records[i * len(records) // count]) for i in range(count)]


def sft_dataset(tokenizer: PreTrainedTokenizerBase, records: Sequence[Mapping[str, Any]], max_length: int) -> Dataset:
    """Chat-template SFT examples: loss on the assistant turns only (other tokens labelled -100).

    A record's optional ``system`` field becomes the system turn; without it the template's default is used,
    as in evaluation.
    """
    return response_loss_dataset(record_tokens(tokenizer, record, max_length) for record in records)


def record_tokens(
    tokenizer: PreTrainedTokenizerBase, record: Mapping[str, Any], max_length: int
) -> tuple[list[int], list[bool]]:
    """:func:`~ssah_peft.chat.tokenize_conversation` of a record's conversation
    (:func:`~ssah_peft.chat.record_messages`: its optional ``system`` field as the system turn, a multi-turn record's
    earlier turns before its prompt), every assistant turn flagged as response."""
    return tokenize_conversation(tokenizer, record_messages(record), max_length)


def response_loss_dataset(sequences: Iterable[tuple[list[int], list[bool]]]) -> Dataset:
    """SFT examples of ``(ids, is_response)`` sequences (:func:`~ssah_peft.chat.tokenize_conversation`): the labels are
    the ids on response tokens and -100 on the others."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, is_response in sequences:
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([token if response else IGNORED for token, response in zip(ids, is_response)])
    return Dataset.from_dict(rows)
