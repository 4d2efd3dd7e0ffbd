"""Model work off the event loop: templating, tokenizing, grammars, big JSON bodies.

The event loop answers every connection (`/health`, `/metrics`, streams in
flight, a shutdown signal), so nothing that grows with a request's size runs
on it. `off_loop(fn, ...)` runs `fn` on a daemon thread and awaits its result.

Daemon threads, not the loop's default executor: an interpreter exits without
waiting for daemon threads, so a request still being prepared never keeps a
stopping server alive. At most `MAX_WORKERS` run at once; the rest wait on
their own threads, never on the loop (`in_thread` has no limit, for work that
mostly waits: downloads, model loads). A cancelled caller (a client that went
away, a server shutting down) stops waiting at once; its work finishes
unobserved.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

MAX_WORKERS = 8
_slots = threading.BoundedSemaphore(MAX_WORKERS)
_count_lock = threading.Lock()
_preparing = 0  # off_loop jobs running or waiting for a worker, in this process


def preparing() -> int:
    """Jobs of off_loop not yet done (for the localllm_requests_preparing gauge)."""
    return _preparing


def _count(delta: int) -> None:
    global _preparing
    with _count_lock:
        _preparing += delta


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on a daemon thread, at most MAX_WORKERS at once; its result or its exception here."""
    return await _on_thread(_slots, fn, args, kwargs)


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Like off_loop, without the limit: for work that mostly waits (a download, a model load)."""
    return await _on_thread(None, fn, args, kwargs)


async def _on_thread(slots: threading.BoundedSemaphore | None, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        if slots is not None:
            slots.acquire()
        try:
            if future.cancelled():
                return  # nobody waits any more
            try:
                result, error = fn(*args, **kwargs), None
            except BaseException as exc:  # handed to the caller, whatever it is
                result, error = None, exc
        finally:
            if slots is not None:
                slots.release()
                _count(-1)
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop has closed: the server stopped meanwhile

    if slots is not None:
        _count(1)
    threading.Thread(target=work, name="localllm-prepare", daemon=True).start()
    return await future
