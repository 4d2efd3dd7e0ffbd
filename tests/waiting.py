"""Waiting for a state, never for a fixed time: loaded CI machines are slow in bursts."""

from __future__ import annotations

import asyncio
import time
from typing import Callable


async def until(condition: Callable[[], object], timeout_s: float = 60.0, what: str = "the condition") -> None:
    """Poll `condition` on the event loop until it holds; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s:g} s")
        await asyncio.sleep(0.01)
