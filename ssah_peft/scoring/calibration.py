"""Calibration data for a scoring pass: (prompt, response) pairs turned into padded token batches.

Scores are only as meaningful as the tokens they are computed on, so this module owns the one decision that
matters about the data: which tokens of a chat exchange are scored (the response, the prompt or both). It renders
each pair with :mod:`ssah_peft.chat`, pads the pairs into batches :func:`ssah_peft.scoring.score_units` reads, and
hashes a calibration set so that shards scored by independent jobs can prove they saw the same data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch

from ..chat import tokenize_exchange

TokenSelection = Literal["response", "prompt", "both"]
TOKEN_SELECTIONS: tuple[str, ...] = ("response", "prompt", "both")

#: A minimal chat template for tokenizers that have none (base models): "User: ...\nAssistant: ...".
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token if eos_token else '' }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

CalibrationPair = Union[tuple[str, str], Mapping[str, str]]


def build_calibration_batches(
    tokenizer: Any,
    pairs: Iterable[CalibrationPair],
    *,
    tokens: TokenSelection = "response",
    batch_size: int = 8,
    max_length: int = 1024,
    chat_template: Optional[str] = None,
    system_prompt: Optional[str] = None,
    padding_side: Optional[Literal["left", "right"]] = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize (prompt, response) pairs with a chat template into padded batches for :func:`score_units`.

    The prompt is rendered as a user turn followed by the generation prompt, the response as the rest of the
    rendered conversation; both parts are tokenized separately (``add_special_tokens=False``: the template
    carries BOS/EOS), so the split is exact and the prompt tokens are those the model sees when generating. The
    pairs' text cannot produce the tokenizer's special tokens (a ``<|im_end|>`` in a response stays text), and a
    text far longer than ``max_length`` is cut before it is tokenized (:func:`ssah_peft.chat.tokenize_exchange`).

    Args:
        tokenizer: a transformers tokenizer.
        pairs: ``(prompt, response)`` tuples or mappings with ``"prompt"`` and ``"response"`` keys, in order.
        tokens: which tokens are scored: ``"response"``, ``"prompt"`` or ``"both"``.
        batch_size: sequences per batch (the last batch may be smaller). Batching does not change the scores.
        max_length: sequences are cut to this many tokens from the right (prompt first, then response).
        chat_template: a Jinja chat template overriding the tokenizer's, e.g. :data:`PLAIN_CHAT_TEMPLATE` for a
            tokenizer without one.
        system_prompt: optional system message put before every prompt.
        padding_side: ``"left"`` or ``"right"``; default: the tokenizer's.

    Returns:
        A list of batches ``{"input_ids", "attention_mask", "position_ids", "score_mask"}`` (CPU tensors;
        ``score_mask`` is boolean and ``False`` on padding). Position ids count real tokens only, so left and
        right padding give the same activations.
    """
    if tokens not in TOKEN_SELECTIONS:
        raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {tokens!r}")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token to pad with; set tokenizer.pad_token")
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    sequences = []
    for pair in pairs:
        ids, is_response = tokenize_exchange(tokenizer, *_as_pair(pair), max_length, system_prompt, chat_template)
        sequences.append((ids, [tokens == "both" or (tokens == "response") == r for r in is_response]))
    if not sequences:
        raise ValueError("No calibration pairs were given")
    return [_pad(sequences[i : i + batch_size], pad_id, side) for i in range(0, len(sequences), batch_size)]


def calibration_data_hash(pairs: Iterable[CalibrationPair]) -> str:
    """sha256 (hex) of a calibration set's content: its (prompt, response) pairs, in order.

    Tuples and mappings with the same text hash alike. Shards scored by independent jobs record the hash of the
    whole set in their metadata (``metadata={"data_sha256": ...}``, as ``ssah-peft score`` does), so that
    :func:`merge_partial_scores` refuses shards of data that changed between the jobs.
    """
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(_as_pair(pair), ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _as_pair(pair: CalibrationPair) -> tuple[str, str]:
    if isinstance(pair, Mapping):
        return pair["prompt"], pair["response"]
    prompt, response = pair
    return prompt, response


def _pad(sequences: Sequence[tuple[list[int], list[bool]]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    score_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, (ids, scored) in enumerate(sequences):
        span = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
        score_mask[row, span] = torch.tensor(scored, dtype=torch.bool)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "score_mask": score_mask,
    }
