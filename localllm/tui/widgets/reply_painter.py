"""Painting a streaming reply at a steady frame rate.

Tokens arrive at engine speed, tens to hundreds a second. Painting each one
makes the UI compete with the engine's threads for the CPU (on a 2-core
machine that cost a third of the decode speed). The painter collects what
arrives between frames and appends it to the Markdown body once per frame;
Textual's `Markdown.append` re-parses only the last, unfinished block, so the
UI's cost follows the frame rate, not the token rate.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from textual.widgets import Markdown

FRAME_S = 1 / 5  # benchmarks/tui_streaming.py on 2 cores: 10 fps cost the engine 14% (0.86x run), 5 fps 10% (0.90x)


class ReplyPainter:
    def __init__(self, body: Markdown, on_frame: Callable[[], None] | None = None, frame_s: float = FRAME_S) -> None:
        self.body = body
        self.on_frame = on_frame
        self.frame_s = frame_s
        self.frames = 0
        self._pending: list[str] = []
        self._arrived = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._paint())

    def add(self, text: str) -> None:
        """Text for the next frame ("" still asks for one: the meter counts held-back tokens too)."""
        if text:
            self._pending.append(text)
        self._arrived.set()

    async def close(self) -> None:
        """Paint what is left, then stop."""
        self._closing = True
        self._arrived.set()
        await self._task

    def cancel(self) -> None:
        self._task.cancel()

    async def _paint(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if self.on_frame is not None:
                self.on_frame()  # before the append, so both changes share one layout pass
            if self._pending:
                text, self._pending = "".join(self._pending), []
                await self.body.append(text)
            self.frames += 1
            if self._closing and not self._pending:
                return
            if not self._closing:
                await asyncio.sleep(self.frame_s)
