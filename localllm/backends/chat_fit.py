"""Fitting a chat into the model's context: the oldest turns go first, and the user is told.

Both chat front ends (the line chat and the full-screen app) call `fit_chat`
before every reply. Tokens are counted with the backend's own tokenizer over
the prompt its chat template renders, so the count is the one the engine will
see. The system prompt and the last user message always stay; whole
exchanges are dropped from the front (a kept chat still starts with a user
turn, which strict model templates require); room is left for the reply.
A system prompt plus last message that alone outgrow the context are an
error, never a silent truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

from localllm.backends.base import Backend

from localllm.core.requests import GenerationRequest
from localllm.core.errors import BadRequest


class ChatTooLong(BadRequest):
    """The system prompt and the last message alone outgrow the context."""


@dataclass
class FittedChat:
    messages: list[dict]  # what to send: the system prompt and the turns that fit
    prompt: str  # `messages` rendered by the model's chat template
    prompt_tokens: int | None  # None when the backend cannot count (a remote upstream counts for itself)
    context: int | None  # the backend's context size in tokens, when known
    dropped_messages: int = 0
    dropped_tokens: int = 0

    @property
    def notice(self) -> str | None:
        """`3 earlier messages, 1,210 tokens, no longer fit in the 4,096-token context`, or None."""
        if not self.dropped_messages or self.context is None:
            return None
        n = self.dropped_messages
        return (
            f"{n:,} earlier message{'s' if n != 1 else ''}, {self.dropped_tokens:,} tokens, "
            f"no longer fit{'s' if n == 1 else ''} in the {self.context:,}-token context"
        )


def context_size(backend: Backend) -> int | None:
    """The tokens one request may use (llama.cpp and the native engine say; a remote upstream may not)."""
    size = backend.n_ctx
    return size if size is not None and size > 0 else None


def reply_reserve(context: int, max_tokens: int | None) -> int:
    """Tokens kept free for the reply: max_tokens, but never more than a quarter of the context."""
    quarter = max(context // 4, 1)
    return min(max_tokens, quarter) if max_tokens else quarter


def count_prompt_tokens(backend: Backend, prompt: str) -> int | None:
    """The tokens the engine will process for a templated `prompt` (BOS included); None if it cannot say."""
    tokens = backend.prompt_tokens(GenerationRequest("count", prompt, templated=True))
    return None if tokens is None else len(tokens)


def fit_chat(backend: Backend, messages: list[dict], *, max_tokens: int | None = None) -> FittedChat:
    """The longest recent part of `messages` whose prompt leaves room for the reply; raises ChatTooLong
    when the system prompt and the last message alone do not fit in the context."""
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system):]
    context = context_size(backend)

    def attempt(first: int) -> FittedChat:
        kept = system + turns[first:]
        prompt = backend.render_chat(kept)
        return FittedChat(kept, prompt, count_prompt_tokens(backend, prompt), context)

    whole = attempt(0)
    if context is None or whole.prompt_tokens is None or not turns:
        return whole
    budget = context - reply_reserve(context, max_tokens)
    if whole.prompt_tokens <= budget:
        return whole
    last = attempt(len(turns) - 1)
    if last.prompt_tokens >= context:
        what = "the system prompt and this message take" if system else "this message takes"
        raise ChatTooLong(
            f"{what} {last.prompt_tokens:,} tokens, more than the whole {context:,}-token context; "
            "shorten it or raise the context size"
        )
    # candidate starts: each user turn after the first; fewer dropped first, the last message alone at worst
    starts = [i for i in range(1, len(turns) - 1) if turns[i].get("role") == "user"] + [len(turns) - 1]
    fitted, low, high = last, 0, len(starts) - 1
    while low < high:  # the fewest dropped turns that fit (the count only shrinks as turns go)
        middle = (low + high) // 2
        candidate = attempt(starts[middle])
        if candidate.prompt_tokens <= budget:
            fitted, high = candidate, middle
        else:
            low = middle + 1
    fitted.dropped_messages = len(turns) - (len(fitted.messages) - len(system))
    fitted.dropped_tokens = whole.prompt_tokens - fitted.prompt_tokens
    return fitted
