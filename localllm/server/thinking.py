"""A request's thinking choice as OpenAI's and Anthropic's APIs word it, and the tokens spent thinking.

Each API says "think" or "don't" its own way (`reasoning_effort`,
`reasoning.effort`, `thinking.type`, `chat_template_kwargs.enable_thinking`);
each becomes the same on/off/unsaid choice, and core/reasoning.py's
`thinking_switch` turns it into template variables: unsaid follows the
catalog's reasoning flag. These clients send such fields to any model, so
asking a model that does not reason to think is ignored, not refused (Ollama's
`think` is the one that refuses).

Usage reports reasoning tokens apart (`reasoning_tokens`): the generated
tokens that arrived before the answer began, in a reply that reasoned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from localllm.core.reasoning import ReasoningStream, ReplyReasoning, Split, template_reasons, thinking_switch
from localllm.core.requests import TokenEvent

log = logging.getLogger("localllm.server")

_OFF_EFFORTS = ("none", "minimal")


def effort_think(effort: Any) -> bool | None:
    """OpenAI's effort as on/off: "none" and "minimal" switch thinking off, any other effort on."""
    if effort is None:
        return None
    return effort not in _OFF_EFFORTS


_TEMPLATE_EFFORTS = ("low", "medium", "high")  # what templates that take `reasoning_effort` (gpt-oss's) know


def template_vars_for(
    template: str | None, think: bool | None, model: str, reasons: bool | None, field: str, effort: Any = None
) -> dict[str, Any]:
    """`enable_thinking` for a request's choice (`field` names it in the log); the model's reasoning flag decides an
    unsaid one. A template that reads `reasoning_effort` (gpt-oss's) also gets the request's low/medium/high."""
    if think and not (template_reasons(template) or reasons):
        log.warning("request for model '%s' asks for '%s': ignored, the model does not reason", model, field)
        think = None
    variables: dict[str, Any] = dict(thinking_switch(template, think, model, reasons))
    if effort in _TEMPLATE_EFFORTS and template and "reasoning_effort" in template:
        variables["reasoning_effort"] = effort
    return variables


def model_reasons(backend: Any) -> bool | None:
    """The catalog's word that a loaded model reasons (None where its info does not say)."""
    return getattr(backend.info, "reasoning", None)


@dataclass
class ThoughtCounter:
    """Counts generated tokens that went to thoughts, fed alongside a reply's ReasoningStream.

    A token counts while the reply reasons and no answer text has come out yet; the
    tokens of the closing tag (and the blank space after it) are thoughts' tokens too.
    From the token that brings the first answer text on, tokens are the answer's.
    """

    tokens: int = 0
    answered: bool = False

    def count(self, event: TokenEvent, stream: ReasoningStream | None, split: Split) -> None:
        if self.answered:
            return
        if stream is None or split.answer:
            self.answered = True
        elif stream.reasoned:
            self.tokens += len(event.token_ids)


def split_tokens(reasoning: ReplyReasoning, tokens: list[TokenEvent]) -> tuple[int, list[TokenEvent]]:
    """A whole (not streamed) reply's thought token count, and its answer's token events."""
    stream = reasoning.stream()
    counter = ThoughtCounter()
    for at, event in enumerate(tokens):
        counter.count(event, stream, stream.feed(event.text) if stream else Split(answer=event.text))
        if counter.answered:
            return counter.tokens, tokens[at:]
    return counter.tokens, []


def reasoning_tokens(reasoning: ReplyReasoning, tokens: list[TokenEvent]) -> int:
    """Thought tokens of a whole (not streamed) reply."""
    return split_tokens(reasoning, tokens)[0]
