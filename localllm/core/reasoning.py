"""Separating a reasoning model's thoughts from its answer, as the text streams.

Reasoning models (Qwen3, DeepSeek-R1 distills, ...) write their thoughts
between ``<think>`` and ``</think>`` before the answer. Some templates put the
opening tag at the end of the generation prompt, so the reply begins inside
the thoughts and only the closing tag arrives. Every front end (the API
routes, the TUI, the line chat) shows the two parts apart, so the split lives
here, below them all.

The tags are text, not special tokens, in many vocabularies: a tag may arrive
spread over several tokens. Like stop strings (backends/textstream.py), text
that could still become a tag is held back until it cannot, so no piece of a
tag ever reaches a user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from localllm.core.errors import BadRequest
from localllm.core.harmony import HarmonyStream, prompt_header, split_harmony, template_is_harmony
from localllm.core.reply_parts import Split
from localllm.core.requests import SamplingParams

OPEN = "<think>"
CLOSE = "</think>"

_BEFORE, _THINKING, _ANSWER = "before", "thinking", "answer"


def template_reasons(template: str | None) -> bool:
    """True when a chat template is a reasoning model's: it writes or mentions the thinking tags,
    or writes harmony messages (gpt-oss), whose analysis channel is its thoughts."""
    return bool(template) and (OPEN in template or "enable_thinking" in template or template_is_harmony(template))


def template_switches_thinking(template: str | None) -> bool:
    """True when a template takes `enable_thinking` (Qwen3), so a request can turn thinking off."""
    return bool(template) and "enable_thinking" in template


def prompt_opens_thoughts(prompt: str) -> bool:
    """True when a rendered prompt ends inside a ``<think>`` block: the reply starts as reasoning."""
    tail = prompt.rstrip()
    return tail.endswith(OPEN)


@dataclass
class ReasoningStream:
    """Feed a reply's text as it arrives; get back its reasoning and answer parts.

    `inside`: the prompt already opened the thoughts (see `prompt_opens_thoughts`);
    a model that opens them once more anyway has that tag dropped. Otherwise a
    reply that begins (after blank space) with ``<think>`` reasons; any other
    reply is all answer. After ``</think>`` everything is answer.
    Whitespace around the thoughts is trimmed, as the tags' own lines are.
    """

    inside: bool = False
    _state: str = field(init=False, default=_BEFORE)
    _pending: str = field(init=False, default="")
    _shown_reasoning: bool = field(init=False, default=False)
    _shown_answer: bool = field(init=False, default=False)
    reasoned: bool = field(init=False, default=False)  # the reply had a thinking part

    def __post_init__(self) -> None:
        self.reasoned = self.inside

    def feed(self, text: str) -> Split:
        self._pending += text
        return self._scan(final=False)

    def flush(self) -> Split:
        """At the end of the reply: whatever was held back (an unclosed thought stays reasoning)."""
        return self._scan(final=True)

    def _scan(self, *, final: bool) -> Split:
        out = Split()
        while True:
            if self._state == _BEFORE:
                head = self._pending.lstrip()
                if head.startswith(OPEN):
                    self._state, self.reasoned = _THINKING, True
                    self._pending = head[len(OPEN) :]
                    continue
                if OPEN.startswith(head) and not final:
                    return out  # blank space or part of the opening tag: wait
                self._state = _THINKING if self.inside else _ANSWER
                continue
            if self._state == _THINKING:
                at = self._pending.find(CLOSE)
                if at >= 0:
                    out.reasoning += self._reasoning_text(self._pending[:at].rstrip())
                    self._pending = self._pending[at + len(CLOSE) :]
                    self._state = _ANSWER
                    continue
                if final:
                    out.reasoning += self._reasoning_text(self._pending.rstrip())
                    self._pending = ""
                    return out
                keep = _held_back(self._pending, CLOSE)
                cut = len(self._pending) - keep
                out.reasoning += self._reasoning_text(self._pending[:cut])
                self._pending = self._pending[cut:]
                return out
            # the answer: all of it, less the blank space that follows the thoughts
            text = self._pending
            if self.reasoned and not self._shown_answer:
                text = text.lstrip()
            self._pending = ""
            if text:
                self._shown_answer = True
            out.answer += text
            return out

    def _reasoning_text(self, text: str) -> str:
        if not self._shown_reasoning:
            text = text.lstrip()
        if text:
            self._shown_reasoning = True
        return text


def _held_back(text: str, tag: str) -> int:
    """How much of the end of `text` must wait: trailing blank space and the start of `tag` after it."""
    partial = 0
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            partial = n
            break
    body = text[: len(text) - partial]
    return len(text) - len(body.rstrip())


def split_reply(text: str, *, inside: bool = False) -> Split:
    """A whole reply's reasoning and answer (for replies that are not streamed)."""
    stream = ReasoningStream(inside=inside)
    first, rest = stream.feed(text), stream.flush()
    return Split(first.reasoning + rest.reasoning, first.answer + rest.answer)


@dataclass(frozen=True)
class ReplyReasoning:
    """How one reply is to be read: whether the model reasons, and whether its prompt opened the thoughts.

    `harmony`: the template writes harmony messages (core/harmony.py reads the reply);
    `header` is then what the prompt already wrote of the reply's first header.
    """

    reasons: bool = False
    inside: bool = False
    harmony: bool = False
    header: str | None = None

    @classmethod
    def of(cls, template: str | None, prompt: str | list[int], params: SamplingParams | None = None) -> "ReplyReasoning":
        """A grammar that holds from the first token (JSON output, a forced tool call) leaves no
        room for thoughts: such a reply is all answer, even after a prompt that opened them."""
        reasons = template_reasons(template)
        constrained = params is not None and params.grammar is not None and not params.grammar_triggers
        if template_is_harmony(template):  # a constrained reply has no markers: read as all answer
            return cls(True, False, True, prompt_header(prompt) if isinstance(prompt, str) else None)
        inside = reasons and not constrained and isinstance(prompt, str) and prompt_opens_thoughts(prompt)
        return cls(reasons, inside)

    def stream(self) -> ReasoningStream | HarmonyStream | None:
        """A fresh splitter for one reply, or None for a model that does not reason."""
        if self.harmony:
            return HarmonyStream(header=self.header)
        return ReasoningStream(inside=self.inside) if self.reasons else None

    def split(self, text: str) -> Split:
        if self.harmony:
            return split_harmony(text, header=self.header)
        return split_reply(text, inside=self.inside) if self.reasons else Split(answer=text)


def thinking_switch(
    template: str | None, think: bool | None, model_name: str, reasons: bool | None = None
) -> dict[str, bool]:
    """Template variables for a request's think on/off choice (`enable_thinking` where the template takes it).

    `reasons`: the catalog's word that the model reasons (ModelInfo.reasoning). A request that
    says nothing then gets thinking on, whatever the template would do unasked; a model the
    catalog does not mark keeps its template's own default. Asking a model that cannot reason
    to think is refused, as Ollama refuses it.
    """
    if think and not (template_reasons(template) or reasons):
        raise BadRequest(f"model '{model_name}' does not support thinking")
    if think is None and reasons:
        think = True
    if think is None or not template_switches_thinking(template):
        return {}
    return {"enable_thinking": bool(think)}
