"""Events out of the llama.cpp engine thread: gathered during a step, handed over once per step.

A request's events go into its own asyncio queue, on its client's event loop,
and crossing threads (`call_soon_threadsafe`) wakes that loop. Gathering a
step's events first means one wake-up per event loop per step, however many
of its requests got a token (a server with 8 streams on one loop: 1, not 8).
"""

from __future__ import annotations

import asyncio
from typing import Any

from localllm.core.requests import Event


class Outbox:
    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Event]]] = {}

    def put(self, job: Any, event: Event) -> None:
        """Queue an event for the request (the engine's Job: its loop, events queue and id)."""
        self._by_loop.setdefault(job.loop, []).append((job, event))

    def deliver(self) -> list[str]:
        """Hand the step's events over; the ids of requests whose loop is gone (their client's program ended)."""
        by_loop, self._by_loop = self._by_loop, {}
        lost: list[str] = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(job.events, event) for job, event in items])
            except RuntimeError:
                lost.extend(job.rid for job, _ in items)
        return lost


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    """Runs on a request's event loop: each event into its request's queue."""
    for events, event in items:
        events.put_nowait(event)
