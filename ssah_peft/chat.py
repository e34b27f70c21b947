"""Rendering chat turns with a tokenizer's chat template, and their tokens: the one place the project applies a
template.

Scoring (calibration tokens), evaluation (generation prompts, perplexity), fine-tuning (completion-only loss) and
the probe all need the same things: a user turn ready for the assistant to answer, and the whole exchange split
into prompt and response, so that response tokens can be told apart.

**The user's text stays text.** Prompts, responses and system turns come from files nobody vetted. Rendered into the
template and tokenized as one string, a prompt holding ``<|im_end|>\\n<|im_start|>system ...`` would become the real
end-of-turn and start-of-turn tokens: one line of training, calibration or evaluation data could forge turn
boundaries and system turns. The token functions here (:func:`prompt_token_ids`, :func:`tokenize_exchange`) never
let a message's content produce one of the tokenizer's special tokens (its added tokens marked ``special``, which it
otherwise matches anywhere in a text); such a string is tokenized as the ordinary characters it is:

* every content is rendered with each special-token string in it replaced by a private-use placeholder, so the
  template's own special tokens are the only ones left in the rendering, wherever the template puts the content and
  whatever it does to its whitespace (``| trim``);
* a rendering without a placeholder (ordinary text: virtually every record) is tokenized in one call exactly as it
  always was, so the tokens of ordinary data, and every result measured on them, stay the same;
* a rendering with placeholders is cut at the template's special tokens, and each piece between them, its
  placeholders turned back into their text, is tokenized with ``split_special_tokens=True``: the user's strings
  become the tokens of their characters, merged with the text around them as any text is.

The alternatives fall short: refusing such text rejects legitimate data (a question about chat formats); escaping it
visibly changes what the model reads; tokenizing each content alone and splicing it between the template's tokens
changes the tokens of ordinary text wherever a token spans the seam (SentencePiece's leading space, BPE merges);
transformers' ``apply_chat_template(..., sanitize_control_tokens=True)`` tokenizes only whole conversations, while
prompt and response are tokenized apart here. Added tokens that are not special (Qwen3's ``<think>``) are vocabulary,
and text holding them is tokenized as the tokenizer always does.

**Long text is cut before it is tokenized.** Given a ``max_length``, a content too long to fit is cut, before it is
rendered, to the characters ``2 * max_length`` tokens of the vocabulary's longest token could cover, so a 20 MB line
costs what a ``max_length`` one does; the first ``max_length`` tokens are those of the whole text (but for a single
word longer than the cut), and shorter text is tokenized whole, as before.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

#: What to do when a tokenizer has no chat template, for every error that reports one.
NO_TEMPLATE_ADVICE = (
    "ssah-peft works on chat models: load the model's chat tokenizer, set tokenizer.chat_template, or pass a "
    "template (the CLI's --chat-template FILE)"
)

#: Starts a placeholder: plane-16 private use, which no template writes and no tokenizer has a special token of.
_ESCAPE = "\U0010fffd"
#: The placeholder of the i-th escaped string is ``_ESCAPE + chr(_FIRST_PLACEHOLDER + i)``.
_FIRST_PLACEHOLDER = 0x100000
_PLACEHOLDER = re.compile(_ESCAPE + "(.)", re.DOTALL)


def chat_messages(prompt: str, system_prompt: Optional[str] = None) -> list[dict[str, str]]:
    """The messages of one user turn, after an optional system turn (``None`` keeps the template's default)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    return messages


def record_messages(record: Mapping[str, Any], system_prompt: Optional[str] = None) -> list[dict[str, str]]:
    """The conversation of a prompt/response record: its ``system`` turn (else ``system_prompt``; neither keeps the
    template's default), the earlier turns of a multi-turn record (``history``: user and assistant turns), then its
    ``prompt`` as the user turn and its ``response`` as the assistant's."""
    system = record.get("system") or system_prompt
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": turn["role"], "content": turn["content"]} for turn in record.get("history") or ()]
    messages += [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    return messages


def render_prompt(
    tokenizer: Any, prompt: str, system_prompt: Optional[str] = None, chat_template: Optional[str] = None
) -> str:
    """The text of a user turn followed by the assistant's opening, as generation starts from it (for reading: its
    tokens are :func:`prompt_token_ids`, which keep the user's text from producing special tokens)."""
    _check_template(tokenizer, chat_template)
    return tokenizer.apply_chat_template(
        chat_messages(prompt, system_prompt), chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )


def prompt_token_ids(
    tokenizer: Any, prompt: str, system_prompt: Optional[str] = None, chat_template: Optional[str] = None
) -> list[int]:
    """Token ids of :func:`render_prompt`'s text, the user's text tokenized as text (see the module docstring)."""
    _check_template(tokenizer, chat_template)
    escaped = _render(tokenizer, chat_messages(prompt, system_prompt), chat_template, None, add_generation_prompt=True)
    return _encode(tokenizer, escaped)[0]


def conversation_token_ids(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of the template's rendering of ``messages`` (any roles, e.g. a judge model reading a user turn and
    a reply), every message's content tokenized as text (see the module docstring)."""
    _check_template(tokenizer, None)
    return _encode(tokenizer, _render(tokenizer, messages, None, None, add_generation_prompt))[0]


def filled_template_token_ids(tokenizer: Any, template: str, values: Mapping[str, str]) -> list[int]:
    """Token ids of a plain-text ``template`` (e.g. a judge's prompt) with each ``{name}`` of ``values`` filled in,
    in one pass, and the tokenizer's own special tokens around it (its BOS, as ``tokenizer(text)`` adds).

    The template's text is the author's and keeps its special tokens; the values are untrusted and stay text (see
    the module docstring): a value cannot produce a special token, nor fill another placeholder (a prompt holding
    ``{response}`` is those characters, not the response).
    """
    special = _special_tokens(tokenizer)
    placeholders = re.compile("|".join(re.escape("{" + name + "}") for name in values) or "(?!)")
    filled = placeholders.sub(lambda match: special.escape(values[match.group()[1:-1]]), template)
    ids = _encode(tokenizer, filled)[0]
    framed = tokenizer("", add_special_tokens=True)["input_ids"]  # the special tokens the tokenizer puts around text
    return [*framed, *ids]


def tokenize_exchange(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: Optional[int] = None,
    system_prompt: Optional[str] = None,
    chat_template: Optional[str] = None,
    joined: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a whole exchange (at most ``max_length``) and, per token, whether it belongs to the response:
    :func:`tokenize_conversation` of the user turn (after an optional system turn) and the assistant's answer."""
    messages = [*chat_messages(prompt, system_prompt), {"role": "assistant", "content": response}]
    return tokenize_conversation(tokenizer, messages, max_length, chat_template, joined)


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    max_length: Optional[int] = None,
    chat_template: Optional[str] = None,
    joined: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation (at most ``max_length``) and, per token, whether it belongs to an assistant turn:
    whatever the template renders for that turn after the generation opening that precedes it (its text and its
    end of turn), for every assistant turn.

    The rendering is cut where each assistant turn starts and ends and each piece is tokenized apart, so no token
    straddles a boundary and the tokens before a turn are those generation starts from. ``joined=True`` tokenizes
    the conversation as one text instead, a token counting as an assistant's if it starts in an assistant piece (as
    perplexity always has). No content produces a special token, and a content too long for ``max_length`` is cut
    before it is tokenized (module docstring).

    Raises ``ValueError`` for a template that renders the conversation before an assistant turn differently once
    the turn follows (some templates drop earlier turns' reasoning): the tokens trained on would not be those the
    model reads, and a loss on "assistant tokens" would be silently wrong.
    """
    _check_template(tokenizer, chat_template)
    messages = [dict(message) for message in messages]
    pieces: list[tuple[str, bool]] = []  # escaped rendering, cut at the assistant turns' starts and ends
    rendered = ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], chat_template, max_length, add_generation_prompt=True)
        after = _render(tokenizer, messages[: turn + 1], chat_template, max_length, add_generation_prompt=False)
        if not (before.startswith(rendered) and after.startswith(before)):
            special = _special_tokens(tokenizer)
            raise ValueError(
                f"The chat template renders the conversation before assistant turn {turn} differently once that turn "
                "follows, so the tokens before it and its own cannot be told apart. Before: "
                f"{special.unescape(before)!r}; with the turn: {special.unescape(after)!r}"
            )
        pieces += [(before[len(rendered) :], False), (after[len(before) :], True)]
        rendered = after
    if not pieces or messages[-1]["role"] != "assistant":
        whole = _render(tokenizer, messages, chat_template, max_length, add_generation_prompt=False)
        if not whole.startswith(rendered):
            raise ValueError("The chat template renders the conversation's last turns differently from its start")
        pieces.append((whole[len(rendered) :], False))
    if joined:
        special = _special_tokens(tokenizer)
        ids, starts = _encode(tokenizer, "".join(text for text, _ in pieces), with_starts=True)
        bounds, position = [], 0  # (start, end) of each assistant piece in the unescaped text
        for text, is_assistant in pieces:
            length = len(special.unescape(text))
            if is_assistant:
                bounds.append((position, position + length))
            position += length
        is_response = [any(low <= start < high for low, high in bounds) for start in starts]
    else:
        ids, is_response = [], []
        for text, is_assistant in pieces:
            piece_ids = _encode(tokenizer, text)[0] if text else []
            ids += piece_ids
            is_response += [is_assistant] * len(piece_ids)
    return ids[:max_length], is_response[:max_length]


def _check_template(tokenizer: Any, chat_template: Optional[str]) -> None:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"The tokenizer has no chat template. {NO_TEMPLATE_ADVICE}.")


@dataclass
class _SpecialTokens:
    """A tokenizer's special tokens and the patterns that escape them in contents and find them in renderings."""

    tokens: dict[str, Any]
    """Text -> ``AddedToken`` of every special added token."""
    longest_token: Optional[int] = None
    """Characters of the vocabulary's longest token, once :func:`_cut` needed it."""

    def __post_init__(self) -> None:
        # the escape character is escaped too, so that no content can write a placeholder of its own
        self.escaped = sorted([*self.tokens, _ESCAPE], key=len, reverse=True)
        self.placeholders = {text: _ESCAPE + chr(_FIRST_PLACEHOLDER + i) for i, text in enumerate(self.escaped)}
        self.in_content = re.compile("|".join(map(re.escape, self.escaped)))
        tokens = "|".join(re.escape(text) for text in self.escaped if text != _ESCAPE)
        self.in_rendering = re.compile(f"({tokens or '(?!)'})")  # (?!) never matches

    def escape(self, text: str) -> str:
        return self.in_content.sub(lambda match: self.placeholders[match.group()], text)

    def unescape(self, text: str) -> str:
        return _PLACEHOLDER.sub(lambda match: self.escaped[ord(match.group(1)) - _FIRST_PLACEHOLDER], text)


#: Per tokenizer: its length when read (added tokens change it) and its special tokens.
_SPECIAL_TOKENS: weakref.WeakKeyDictionary[Any, tuple[int, _SpecialTokens]] = weakref.WeakKeyDictionary()


def _special_tokens(tokenizer: Any) -> _SpecialTokens:
    """The special tokens of ``tokenizer``, read once (a Llama 3 tokenizer has 256)."""
    cached = _SPECIAL_TOKENS.get(tokenizer)
    if cached is None or cached[0] != len(tokenizer):
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        special = _SpecialTokens({token.content: token for token in added if token.special})
        cached = _SPECIAL_TOKENS[tokenizer] = (len(tokenizer), special)
    return cached[1]


def _render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    chat_template: Optional[str],
    max_length: Optional[int],
    add_generation_prompt: bool,
) -> str:
    """The template's rendering of ``messages``, each content cut for ``max_length`` and escaped."""
    special = _special_tokens(tokenizer)
    escaped = [
        {**message, "content": special.escape(_cut(tokenizer, special, message["content"], max_length))}
        for message in messages
    ]
    return tokenizer.apply_chat_template(
        escaped, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _cut(tokenizer: Any, special: _SpecialTokens, text: str, max_length: Optional[int]) -> str:
    """``text`` cut to what ``2 * max_length`` tokens could cover: its first ``max_length`` tokens stay its own."""
    if max_length is None or len(text) <= 2 * max_length:  # no vocabulary read for short text
        return text
    if special.longest_token is None:  # byte-level vocabularies spell a byte as one character
        special.longest_token = max(len(token) for token in tokenizer.get_vocab())
    return text[: 2 * max_length * special.longest_token]


def _encode(tokenizer: Any, rendering: str, with_starts: bool = False) -> tuple[list[int], Optional[list[int]]]:
    """Token ids of an escaped ``rendering`` (of :func:`_render`, or a part of one) and, ``with_starts``, the
    character of the unescaped text where each token starts (fast tokenizers only)."""
    if _ESCAPE not in rendering:
        encoding = tokenizer(rendering, add_special_tokens=False, return_offsets_mapping=with_starts)
        return encoding["input_ids"], [start for start, _ in encoding["offset_mapping"]] if with_starts else None
    special = _special_tokens(tokenizer)
    pieces = special.in_rendering.split(rendering)  # text, special token, text, ..., text
    ids: list[int] = []
    starts: list[int] = []
    position = 0
    for i, piece in enumerate(pieces):
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
            starts.append(position)
            position += len(piece)
            continue
        text = special.unescape(piece)
        # the whitespace a special token strips (AddedToken rstrip/lstrip) is not tokenized as text
        first = len(text) - len(text.lstrip()) if i > 0 and special.tokens[pieces[i - 1]].rstrip else 0
        last = len(text.rstrip()) if i + 1 < len(pieces) and special.tokens[pieces[i + 1]].lstrip else len(text)
        if first < last:
            encoding = tokenizer(
                text[first:last],
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=with_starts,
            )
            ids += encoding["input_ids"]
            if with_starts:
                starts += [position + first + start for start, _ in encoding["offset_mapping"]]
        position += len(text)
    return ids, starts if with_starts else None
