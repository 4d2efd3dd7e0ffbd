"""Reading a gpt-oss ("harmony" format) reply as it streams: thoughts, answer, tool calls.

Harmony models do not wrap their thoughts in ``<think>`` tags. A reply is a
sequence of messages, each a header and a body::

    <|channel|>analysis<|message|>...thoughts...<|end|>
    <|start|>assistant<|channel|>final<|message|>...answer...<|return|>

(the prompt ends with ``<|start|>assistant``, so the first header arrives
without it). The header's channel says what the body is: ``analysis`` is
reasoning, ``final`` is the answer, and ``commentary`` is either a preamble the
user may see (answer) or, when the header names a recipient such as
``to=functions.get_weather``, a tool call whose body is its JSON arguments,
ended by ``<|call|>``.

A tool call is handed on in the Hermes form (``<tool_call>{"name": ..,
"arguments": ..}</tool_call>``) inside the answer text, so the one tool-call
reader (server/tools.py) reads it, streamed or whole, cut by max_tokens or not.

Markers may arrive spread over several pieces of text; like the ``<think>``
splitter, text that could still become a marker is held back until it cannot.
A reply that does not begin with a marker (a grammar forced its shape, or the
model ignores the format) is all answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from localllm.core.reply_parts import Split

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"
MARKERS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
_MESSAGE_ENDS = (END, RETURN, CALL)
_LONGEST_HEADER = 256  # a header longer than this is not one: the reply does not follow the format

_HEADER, _BODY, _DONE, _PLAIN = "header", "body", "done", "plain"
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")


def template_is_harmony(template: str | None) -> bool:
    """True when a chat template writes harmony messages (gpt-oss)."""
    return bool(template) and CHANNEL in template and START in template


def prompt_header(prompt: str) -> str | None:
    """The header a rendered prompt leaves open for the reply (``assistant`` after ``<|start|>``), or None."""
    at = prompt.rfind(START)
    if at < 0:
        return None
    tail = prompt[at + len(START) :]
    if any(end in tail for end in _MESSAGE_ENDS):
        return None
    return tail


@dataclass(frozen=True)
class _Header:
    channel: str
    recipient: str | None

    @classmethod
    def parse(cls, text: str) -> "_Header":
        channel = _CHANNEL_NAME.search(text)
        recipient = _RECIPIENT.search(text)
        return cls(channel.group(1) if channel else "", recipient.group(1) if recipient else None)

    @property
    def tool(self) -> str | None:
        """The function a message calls (``to=functions.NAME``), if it is a call."""
        if self.recipient and self.recipient.startswith("functions."):
            return self.recipient[len("functions.") :]
        return None


@dataclass
class HarmonyStream:
    """Feed a harmony reply's text as it arrives; get back its reasoning and answer (see module doc).

    `header`: what the prompt already wrote of the first message's header
    (`prompt_header`); None when the prompt left no header open.
    """

    header: str | None = "assistant"
    reasoned: bool = field(init=False, default=False)  # the reply had an analysis part
    _state: str = field(init=False, default=_HEADER)
    _fresh: bool = field(init=False, default=True)  # nothing of the reply seen yet
    _head: str = field(init=False, default="")
    _message: _Header = field(init=False, default=_Header("", None))
    _pending: str = field(init=False, default="")
    _shown: dict[str, bool] = field(init=False, default_factory=dict)  # kind -> something shown
    _started: bool = field(init=False, default=False)  # the current message has shown text
    _arguments: str = field(init=False, default="")  # the current tool call's body so far

    def __post_init__(self) -> None:
        """Read what the prompt wrote of the reply (its output was the prompt's, so it is dropped)."""
        self._fresh, self._pending = False, self.header or ""
        self._scan(final=False)
        self._fresh = self._state == _HEADER and MESSAGE not in (self.header or "")

    def feed(self, text: str) -> Split:
        self._pending += text
        return self._scan(final=False)

    def flush(self) -> Split:
        """At the end of the reply: whatever was held back. A call whose arguments are whole JSON is
        closed (its <|call|> is a stop token, never shown); one cut short stays open for the tool reader."""
        return self._scan(final=True)

    def _scan(self, *, final: bool) -> Split:
        out = Split()
        while self._pending:
            if self._state == _PLAIN:
                out.answer += self._pending
                self._pending = ""
                break
            if self._state == _DONE:  # after <|return|> or <|call|>: nothing more is the reply's
                self._pending = ""
                break
            if self._fresh and self._state == _HEADER:
                head = self._pending.lstrip()
                if not final and (not head or head == "<"):
                    break  # blank space, or what may yet open a marker: wait
                if not head.startswith("<|"):
                    self._state = _PLAIN  # not harmony: all answer
                    continue
                self._fresh = False
            at, marker = _first_marker(self._pending)
            if marker is None:
                keep = _partial_marker(self._pending)  # at the end, a marker cut short is dropped
                self._text(self._pending[: len(self._pending) - keep], out)
                self._pending = "" if final else self._pending[len(self._pending) - keep :]
                break
            self._text(self._pending[:at], out)
            self._pending = self._pending[at + len(marker) :]
            self._marker(marker, out)
        if final:
            self._close_message(out, finished=False)
        return out

    def _text(self, text: str, out: Split) -> None:
        if not text:
            return
        if self._state == _HEADER:
            self._head += text
            if len(self._head) > _LONGEST_HEADER:  # the reply does not follow the format after all
                out.answer += self._head
                self._head, self._state = "", _PLAIN
            return
        if self._state == _BODY:
            self._emit(text, out)

    def _marker(self, marker: str, out: Split) -> None:
        if self._state == _HEADER:
            if marker == MESSAGE:
                self._open_message(out)
            elif marker == START:
                self._head = ""
            else:
                self._head += marker
            return
        # in a body: a message end, or (a model that skipped its end) the next header
        self._close_message(out, finished=True)
        if marker in (RETURN, CALL):
            self._state = _DONE
            return
        self._state, self._head = _HEADER, ("" if marker in (START, END) else marker)

    def _open_message(self, out: Split) -> None:
        self._message = _Header.parse(self._head)
        self._head, self._state, self._started, self._arguments = "", _BODY, False, ""
        if self._message.tool is not None:
            opening = f'<tool_call>{{"name": {json.dumps(self._message.tool)}, "arguments": '
            out.answer += self._separator("answer") + opening
            self._shown["answer"] = True
            self._started = True

    def _close_message(self, out: Split, *, finished: bool) -> None:
        if self._state != _BODY:
            return
        if self._message.tool is not None and (finished or _whole_json(self._arguments)):
            out.answer += "}</tool_call>"  # a call ended by the end of the reply (<|call|> is a stop token) is whole
        self._state = _HEADER

    def _emit(self, text: str, out: Split) -> None:
        if self._message.tool is not None:
            self._arguments += text
            out.answer += text
            return
        kind = "reasoning" if self._message.channel == "analysis" else "answer"
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            text = self._separator(kind) + text
            self._started = True
        self._shown[kind] = True
        if kind == "reasoning":
            self.reasoned = True
            out.reasoning += text
        else:
            out.answer += text

    def _separator(self, kind: str) -> str:
        """A blank line between two messages of the same kind (two analysis messages, say)."""
        return "\n\n" if self._shown.get(kind) else ""


def _whole_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _first_marker(text: str) -> tuple[int, str | None]:
    best, found = -1, None
    for marker in MARKERS:
        at = text.find(marker)
        if at >= 0 and (best < 0 or at < best):
            best, found = at, marker
    return best, found


def _partial_marker(text: str) -> int:
    """Length of the longest end of `text` that begins some marker."""
    for n in range(min(len(text), max(len(m) for m in MARKERS) - 1), 0, -1):
        tail = text[-n:]
        if any(m.startswith(tail) for m in MARKERS):
            return n
    return 0


def split_harmony(text: str, header: str | None = "assistant") -> Split:
    """A whole harmony reply's reasoning and answer (for replies that are not streamed)."""
    stream = HarmonyStream(header=header)
    first, rest = stream.feed(text), stream.flush()
    return Split(first.reasoning + rest.reasoning, first.answer + rest.answer)
