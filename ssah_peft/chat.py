"""Rendering chat turns with a tokenizer's chat template: the one place the project applies a template.

Scoring (calibration tokens), evaluation (generation prompts, perplexity), fine-tuning (completion-only loss) and
the probe all need the same two things: the text of a user turn ready for the assistant to answer, and the text of
the whole exchange split into prompt and response, so that response tokens can be told apart.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

#: What to do when a tokenizer has no chat template, for every error that reports one.
NO_TEMPLATE_ADVICE = (
    "ssah-peft works on chat models: load the model's chat tokenizer, set tokenizer.chat_template, or pass a "
    "template (the CLI's --chat-template FILE)"
)


def chat_messages(prompt: str, system_prompt: Optional[str] = None) -> list[dict[str, str]]:
    """The messages of one user turn, after an optional system turn (``None`` keeps the template's default)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    return messages


def render_prompt(
    tokenizer: Any, prompt: str, system_prompt: Optional[str] = None, chat_template: Optional[str] = None
) -> str:
    """The text of a user turn followed by the assistant's opening, as generation starts from it."""
    _check_template(tokenizer, chat_template)
    return tokenizer.apply_chat_template(
        chat_messages(prompt, system_prompt), chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )


def render_exchange(
    tokenizer: Any,
    prompt: str,
    response: str,
    system_prompt: Optional[str] = None,
    chat_template: Optional[str] = None,
) -> tuple[str, str]:
    """``(prompt_text, full_text)`` of a user turn answered by ``response``; ``full_text`` starts with
    ``prompt_text``, so ``full_text[len(prompt_text):]`` is the response with whatever the template puts after it.

    Raises ``ValueError`` for a template that renders the prompt differently once a response follows: prompt and
    response tokens could not be told apart, and a loss or score on "response tokens" would be silently wrong.
    """
    prompt_text = render_prompt(tokenizer, prompt, system_prompt, chat_template)
    messages = [*chat_messages(prompt, system_prompt), {"role": "assistant", "content": response}]
    full_text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "The chat template renders the prompt differently with and without the response, so prompt and "
            f"response tokens cannot be told apart. Prompt render: {prompt_text!r}; full render: {full_text!r}"
        )
    return prompt_text, full_text


def tokenize_exchange(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    system_prompt: Optional[str] = None,
    chat_template: Optional[str] = None,
) -> tuple[list[int], list[bool]]:
    """Token ids of a whole exchange (at most ``max_length``) and, per token, whether it belongs to the response.

    Prompt and response are tokenized separately, so no token straddles the boundary.
    """
    prompt_text, full_text = render_exchange(tokenizer, prompt, response, system_prompt, chat_template)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    is_response = ([False] * len(prompt_ids) + [True] * len(response_ids))[:max_length]
    return ids, is_response


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids must go: the device of its input embeddings (first device under a device_map)."""
    return model.get_input_embeddings().weight.device


def _check_template(tokenizer: Any, chat_template: Optional[str]) -> None:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"The tokenizer has no chat template. {NO_TEMPLATE_ADVICE}.")
