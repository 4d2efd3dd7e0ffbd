"""Streaming a generation to a terminal: shared by `run` and the line chat."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Callable, TextIO

from localllm.backends.base import Backend
from localllm.core.reasoning import ReasoningStream
from localllm.core.reply_parts import Split
from localllm.core.requests import FinishEvent, GenerationRequest, TokenEvent

DIM, RESET = "\x1b[2m", "\x1b[0m"


def stream_to(backend: Backend, request: GenerationRequest, write: Callable[[str], None]) -> FinishEvent:
    """Run `request`, writing text as it arrives; Ctrl+C aborts it and returns its finish event."""

    async def consume() -> FinishEvent:
        agen = backend.generate(request)
        try:
            async for event in agen:
                if isinstance(event, TokenEvent):
                    if event.text:
                        write(event.text)
                else:
                    return event
        finally:
            await agen.aclose()
        raise RuntimeError("the engine ended a request without a finish event")

    loop = asyncio.new_event_loop()
    interrupt_aborts = _abort_on_ctrl_c(loop, lambda: backend.abort(request.request_id))
    try:
        return loop.run_until_complete(consume())  # an abort still ends with a finish event
    finally:
        if interrupt_aborts:
            loop.remove_signal_handler(signal.SIGINT)
        loop.close()


def _abort_on_ctrl_c(loop: asyncio.AbstractEventLoop, abort: Callable[[], None]) -> bool:
    """Make Ctrl+C stop the reply rather than the program, where the platform allows."""
    try:
        loop.add_signal_handler(signal.SIGINT, abort)
        return True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        return False


def stdout_writer(out: TextIO = sys.stdout) -> Callable[[str], None]:
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write


class ThoughtsFirst:
    """Writes a reasoning model's reply: its thoughts dimmed (plain when not a terminal), a blank line, the answer.

    `answer` collects the answer alone: that is what goes back into the conversation.
    """

    def __init__(self, thoughts: ReasoningStream, out: TextIO = sys.stdout) -> None:
        self.thoughts = thoughts
        self.out = out
        self.dim = out.isatty()
        self.answer: list[str] = []
        self._thought = False  # some thought was written
        self._answered = False

    def __call__(self, text: str) -> None:
        self._write(self.thoughts.feed(text))

    def finish(self) -> None:
        self._write(self.thoughts.flush())

    def _write(self, split: Split) -> None:
        if split.reasoning:
            self._thought = True
            self.out.write(f"{DIM}{split.reasoning}{RESET}" if self.dim else split.reasoning)
        if split.answer:
            if self._thought and not self._answered:
                self.out.write("\n\n")
            self._answered = True
            self.answer.append(split.answer)
            self.out.write(split.answer)
        self.out.flush()


def format_stats(event: FinishEvent) -> str:
    u, t = event.usage, event.timings
    rate = t.decode_tokens_per_s(u.completion_tokens)
    cached = f" ({u.cached_prompt_tokens} reused)" if u.cached_prompt_tokens else ""
    guesses = f", {u.accepted_draft_tokens}/{u.draft_tokens} speculative guesses kept" if u.draft_tokens else ""
    return (
        f"prompt: {u.prompt_tokens} tokens{cached} in {t.prompt_s * 1000:.0f} ms, "
        f"TTFT {t.ttft_s * 1000:.0f} ms | output: {u.completion_tokens} tokens, {rate:.1f} tok/s{guesses} | "
        f"finish: {event.reason}"
    )
