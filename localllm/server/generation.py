"""One generation in flight, shared by the OpenAI and Ollama routes.

The routes have the backend check and tokenize a request with its `prepare`,
off the event loop (offloop.py); `start_run` hands the request to the model's backend and returns a Run whose
`events()` the route turns into its own response shape. Several runs of one
request (OpenAI's `n` choices) go side by side through `collect_all` and
`merged_events`, so the engine batches them. Three promises:

* Errors the backend finds before it queues the request (invalid values, a
  prompt longer than the context) surface from `start_run`, so the route can
  still answer with an HTTP error instead of a stream.
* Whatever ends the response (the last event, an error, a client that went
  away, a cancelled task) closes the backend's stream, which aborts the
  request in the engine, and releases the model lease. Nothing keeps running
  for a client that is gone.
* Metrics are recorded as events pass: time to first token, the gaps between
  tokens, token counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from localllm.core.requests import Event, FinishEvent, GenerationRequest, TokenEvent
from localllm.server.metrics import Metrics
from localllm.server.registry import Lease

T = TypeVar("T")
log = logging.getLogger("localllm.server")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Run:
    lease: Lease
    request: GenerationRequest
    metrics: Metrics
    _agen: AsyncIterator[Event]
    _first: asyncio.Task
    started: float = field(default_factory=time.perf_counter)
    finish: FinishEvent | None = None
    _closed: bool = False

    async def events(self) -> AsyncIterator[Event]:
        """The backend's events, ending with its FinishEvent; closes the run however it ends."""
        last_token_at: float | None = None
        try:
            event = await self._first
            while True:
                if isinstance(event, TokenEvent) and event.token_ids:
                    now = time.perf_counter()
                    if last_token_at is None:
                        self.metrics.time_to_first_token.observe(now - self.started)
                    else:
                        self.metrics.inter_token_latency.observe(now - last_token_at)
                    last_token_at = now
                    # counted as they arrive, so an aborted request's tokens count too
                    self.metrics.generated_tokens.inc(len(event.token_ids))
                if isinstance(event, FinishEvent):
                    self.finish = event
                    self.metrics.prompt_tokens.inc(event.usage.prompt_tokens)
                    if event.usage.draft_tokens:
                        self.metrics.speculative_acceptance.observe(event.usage.accepted_draft_tokens / event.usage.draft_tokens)
                yield event
                if isinstance(event, FinishEvent):
                    return
                event = await self._agen.__anext__()
        finally:
            await self.close()

    async def close(self) -> None:
        """Abort the request if it is still running and give the model back; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._first.done():
                self._first.cancel()
                await asyncio.wait({self._first})  # the generator must be idle before it is closed
            await self._agen.aclose()  # the backend aborts a request whose stream is closed early
        finally:
            self.lease.registry.generation_ended(self.request.request_id)
            self.lease.release()


async def start_run(lease: Lease, request: GenerationRequest, metrics: Metrics) -> Run:
    """Queue `request` on the lease's backend; raise what the backend rejects up front.

    The backend's `generate` checks the request synchronously and then waits
    for its first event; running its first step as a task and yielding once
    lets those checks raise here, before any response has started.
    """
    agen = lease.backend.generate(request)
    first = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0)
    if lease.backend.acknowledges_requests:
        # The remote backend learns only from its upstream whether a request is accepted, and
        # says so with an empty first event: waiting for it makes a refusal (upstream down, its
        # 4xx) this reply's HTTP status instead of an error inside a stream.
        try:
            await asyncio.wait({first})
        except BaseException:
            first.cancel()  # the generator's cleanup closes the upstream request
            raise
    if first.done() and first.exception() is not None:
        error = first.exception()
        await agen.aclose()
        raise error  # type: ignore[misc]
    lease.registry.generation_started(request.request_id, lease.backend)
    if lease.registry.stopping:
        lease.backend.abort(request.request_id)  # the server is stopping: this reply ends at once
    return Run(lease, request, metrics, agen, first)


async def collect(run: Run, request: Request) -> tuple[list[TokenEvent], FinishEvent]:
    """All of a run's events for a non-streaming reply; a client that disconnects aborts it."""
    return (await collect_all([run], request))[0]


async def collect_all(runs: list[Run], request: Request) -> list[tuple[list[TokenEvent], FinishEvent]]:
    """`collect` for runs generated side by side (`n` choices); a disconnect aborts them all."""

    async def gather(run: Run) -> tuple[list[TokenEvent], FinishEvent]:
        tokens: list[TokenEvent] = []
        async for event in run.events():
            if isinstance(event, TokenEvent):
                tokens.append(event)
            else:
                return tokens, event
        raise RuntimeError("the engine ended a request without a finish event")

    tasks = [asyncio.ensure_future(gather(run)) for run in runs]
    try:
        return await until_disconnected(request, asyncio.gather(*tasks))
    finally:
        for task in tasks:  # one failed or the client left: the others stop before their runs close
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(runs)


async def close_all(runs: list[Run]) -> None:
    for run in runs:
        await run.close()


_DONE = object()


async def merged_events(runs: list[Run]) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) from runs generated side by side, as each event arrives.

    Each run ends with its FinishEvent; whatever ends the iteration stops
    every run still going (close this generator with `contextlib.aclosing`).
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, run: Run) -> None:
        try:
            async for event in run.events():
                queue.put_nowait((index, event))
        except Exception as exc:  # raised to the reader, in order
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, _DONE))

    pumps = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        running = len(runs)
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await close_all(runs)


class ClientGone(Exception):
    """The client closed its connection before the reply was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def guarded(lines: AsyncIterator[bytes], error_line: Callable[[str], bytes]) -> AsyncIterator[bytes]:
    """A response body that ends with an error line, not a cut connection, if building it fails."""
    try:
        async for line in lines:
            yield line
    except Exception as exc:  # headers are out: the error can only travel in the stream
        log.error("a streamed reply failed", exc_info=exc)
        yield error_line(f"internal error ({type(exc).__name__}); the server log has the details")
    finally:
        await lines.aclose()  # type: ignore[attr-defined]


class EventStreamResponse(StreamingResponse):
    """A streaming response that always closes its body iterator, whatever ends it.

    Starlette cancels the body when the client disconnects; closing the
    iterator then runs its `finally` blocks at once (abort the request,
    release the model) instead of whenever the garbage collector gets to it.
    """

    def __init__(self, content: AsyncIterator[bytes], media_type: str, on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._on_close()
