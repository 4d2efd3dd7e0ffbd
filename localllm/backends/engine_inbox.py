"""What a local backend's front side and its engine thread share.

A `Job` is one request as the engine thread sees it: the checked prompt, the
caller's loop and queue its events go to, and the engine's bookkeeping. The
`Control` holds the engine's inbox and, behind one lock, which request ids are
queued or running, which of those were asked to stop, and the published stats.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from localllm.backends.textstream import TextStream
from localllm.core.requests import EngineStats, GenerationRequest, Timings, Usage

WAKE = "wake"  # an inbox message that only wakes an idle engine


@dataclass
class Job:
    """One request as the engine thread sees it; only that thread writes it after it is queued."""

    request: GenerationRequest
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    limit: int  # most tokens it may generate (max_tokens, and what the context leaves)
    queued_at: float = field(default_factory=time.perf_counter)
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    stream: TextStream | None = None
    admitted_at: float = 0.0  # when the engine began on it
    first_at: float = 0.0
    last_at: float = 0.0
    # each engine's own state for the request
    generated: list[int] = field(default_factory=list)  # llama.cpp: output so far (a preempted request resumes)
    sampler: Any = None  # llama.cpp: its sampler chain
    spec: Any = None  # llama.cpp: its guessing record (SpecRecord), when the engine speculates
    seq: Any = None  # native: the engine's Sequence

    @property
    def rid(self) -> str:
        return self.request.request_id


class Control:
    """What the front side and the engine thread share; everything behind one lock."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Any] = queue.Queue()  # jobs, WAKE, None (stop); llama.cpp: embedding jobs too
        self.lock = threading.Lock()
        self.active: set[str] = set()  # request ids queued or running
        self.aborted: set[str] = set()  # the subset of active asked to stop
        self.stats = EngineStats()

    def abort(self, request_id: str) -> None:
        with self.lock:
            if request_id not in self.active:
                return
            self.aborted.add(request_id)
        self.inbox.put(WAKE)

    def is_aborted(self, request_id: str) -> bool:
        with self.lock:
            return request_id in self.aborted
