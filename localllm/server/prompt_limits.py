"""Cheap limits checked before a request costs real work (templating, tokenizing).

A prompt that cannot fit the model's context is refused by counting, not by
tokenizing megabytes first:

* every message costs at least one token in any chat template, so a chat with
  more messages than the context has tokens cannot fit; before the model is
  even known, more than MAX_MESSAGES is refused;
* no vocabulary has tokens much longer than CHARS_PER_TOKEN characters (runs
  of spaces are the longest), so more characters than that per context token
  cannot fit either.

Each refusal is a 400 that names the limit.
"""

from __future__ import annotations

from typing import Any, Iterable

from localllm.server.errors import APIError

MAX_MESSAGES = 16_384
CHARS_PER_TOKEN = 32


def check_message_count(count: int, n_ctx: int | None = None, param: str = "messages") -> None:
    limit = MAX_MESSAGES if n_ctx is None else min(MAX_MESSAGES, n_ctx)
    if count > limit:
        why = f"the model's context holds {n_ctx} tokens" if n_ctx is not None and n_ctx < MAX_MESSAGES else "the server's limit"
        raise APIError(400, f"too many messages: {count}; at most {limit} ({why})", param=param, code="too_many_messages")


def check_prompt_chars(chars: int, n_ctx: int | None, param: str) -> None:
    if n_ctx is None:
        return  # a remote model: its server knows its context
    limit = n_ctx * CHARS_PER_TOKEN
    if chars > limit:
        raise APIError(
            400,
            f"the prompt has {chars} characters, more than a context of {n_ctx} tokens can hold "
            f"(at most {limit}: {CHARS_PER_TOKEN} per token)",
            param=param,
            code="prompt_too_long",
        )


def text_chars(values: Iterable[Any]) -> int:
    """Characters of text in message contents: strings, or lists of parts with a `text`."""
    total = 0
    for value in values:
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            for part in value:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    total += len(text)
    return total
