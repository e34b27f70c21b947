"""Running the model under evaluation: greedy chat responses and the perplexity of reference responses.

Every suite (:mod:`.suites`) and the degradation scan (:mod:`ssah_peft.analysis.scan`) needs the same two model
passes, and they must treat the chat template the same way, so they live here once: :func:`generate_responses`
tokenizes each prompt as a user turn (:func:`ssah_peft.chat.prompt_token_ids`) and decodes greedily in left-padded
batches; :func:`perplexity` scores only what the template renders after the prompt
(:func:`ssah_peft.chat.tokenize_conversation`). Both keep the prompts' and responses' text from producing the
tokenizer's special tokens. :class:`GenerationSettings` carries the options both share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..chat import prompt_token_ids, record_messages, tokenize_conversation
from ..devices import input_device


@dataclass
class GenerationSettings:
    """How responses are generated: greedy, through the chat template, in left-padded batches."""

    max_new_tokens: int = 64
    batch_size: int = 16
    system_prompt: Optional[str] = None
    """Optional system turn; None keeps the chat template's default (some templates insert one)."""
    show_progress: bool = True


def _stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn tokens: the model's generation EOS ids (chat models often list several) and the tokenizer's."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return sorted(ids)


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: Optional[GenerationSettings] = None,
    desc: str = "generating",
) -> list[str]:
    """Greedy responses to ``prompts`` (user turns), in input order.

    Prompts are batched by length (less padding) and left-padded, so every sequence's last prompt token is
    where generation starts; with the attention mask this gives the same tokens as unbatched decoding.
    """
    settings = settings or GenerationSettings()
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token).")
    prompt_ids = [prompt_token_ids(tokenizer, prompt, settings.system_prompt) for prompt in prompts]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_stop_token_ids(model, tokenizer),
    )
    was_training = model.training
    model.eval()
    device = input_device(model)
    responses: list[str] = [""] * len(prompt_ids)
    try:
        with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", disable=not settings.show_progress) as bar:
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                inputs = tokenizer.pad(
                    {"input_ids": [prompt_ids[i] for i in batch]}, padding_side="left", return_tensors="pt"
                ).to(device)
                output = model.generate(**inputs, generation_config=config)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    responses[i] = text.strip()
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return responses


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[Mapping[str, Any]],
    batch_size: int = 8,
    system_prompt: Optional[str] = None,
    show_progress: bool = True,
    max_length: Optional[int] = None,
) -> dict[str, float]:
    """Perplexity of the assistant responses of ``records`` (prompt, response; a multi-turn record's every
    assistant turn) given what precedes them (:func:`ssah_peft.chat.record_messages`: a record's ``system`` field,
    else ``system_prompt``, as the system turn).

    Only what the chat template renders after each generation prompt is scored: the response, its end-of-turn
    token and any text the template puts after it. The mean NLL is weighted by tokens; ``ppl = exp(mean_nll)``.
    ``max_length`` scores each exchange's first ``max_length`` tokens only (default: the whole text), as fine-tuning
    trains them, and keeps one long record from costing more.
    """
    conversations = [record_messages(r, system_prompt) for r in records]
    was_training = model.training
    model.eval()
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    try:
        for start in tqdm(range(0, len(conversations), batch_size), desc="perplexity", disable=not show_progress):
            exchanges = [
                tokenize_conversation(tokenizer, messages, max_length, joined=True)
                for messages in conversations[start : start + batch_size]
            ]
            batch = {"input_ids": [ids for ids, _ in exchanges]}
            encoded = tokenizer.pad(batch, padding_side="right", return_tensors="pt")
            scored = torch.zeros_like(encoded["attention_mask"], dtype=torch.bool)
            for row, (_, is_response) in enumerate(exchanges):
                scored[row, : len(is_response)] = torch.tensor(is_response, dtype=torch.bool)
            encoded = encoded.to(device)
            logits = model(**encoded).logits[:, :-1]
            targets = encoded["input_ids"][:, 1:]
            mask = scored[:, 1:].to(device)
            total_nll += float(F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"))
            total_tokens += int(mask.sum())
    finally:
        model.train(was_training)
    mean_nll = total_nll / max(total_tokens, 1)
    return {"texts": len(conversations), "tokens": total_tokens, "mean_nll": mean_nll, "ppl": math.exp(mean_nll)}
