"""The context an engine opens with, whether a prompt fits it, and how much room it leaves: one rule for every engine.

The local backends check a request before it queues; the native engine checks
again when a request is added to it directly (tests, benchmarks). A prompt
must leave room for at least one generated token; `max_tokens` never reaches
past the context, it is cut to what the prompt leaves.
"""

from __future__ import annotations

from localllm.core.errors import BadRequest, PromptTooLong

DEFAULT_CONTEXT = 4096  # tokens, when nobody asks for a context size (capped by the model's trained context)
MIN_CONTEXT = 16


def context_size(requested: int | None, trained: int | None) -> int:
    """The context an engine opens with: the one asked for, within what the model was trained
    for; without a request, DEFAULT_CONTEXT or the trained context if that is smaller."""
    trained = trained or DEFAULT_CONTEXT
    if not requested:
        return min(DEFAULT_CONTEXT, trained)
    if requested < MIN_CONTEXT:
        raise BadRequest(f"context size must be at least {MIN_CONTEXT} tokens (got {requested})")
    if requested > trained:
        raise BadRequest(f"context size {requested} is larger than the {trained} tokens the model was trained for")
    return requested


def check_prompt(prompt_tokens: int, context: int) -> None:
    """Refuse an empty prompt, or one that fills the context."""
    if prompt_tokens == 0:
        raise BadRequest("the prompt is empty")
    if prompt_tokens >= context:
        raise PromptTooLong(prompt_tokens, context)


def generation_limit(prompt_tokens: int, context: int, max_tokens: int | None) -> int:
    """The most tokens a request whose prompt `check_prompt` accepted may generate:
    its max_tokens, within what the prompt leaves of the context."""
    room = context - prompt_tokens
    return room if max_tokens is None else min(room, max_tokens)
