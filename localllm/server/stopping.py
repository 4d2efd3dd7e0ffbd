"""A stopping server ends its requests with answers, not with tracebacks in its log.

When uvicorn stops (SIGTERM, Ctrl+C, the terminal UI's Stop) it lets running
requests finish for a grace period and then cancels them, logging each as an
"Exception in ASGI application". Before the grace period the registry aborts
every generation, so streams and replies end complete at once (run.py). A
request still being prepared or waiting for a model when the grace period
ends is cancelled; this middleware answers it 503 if nothing was sent yet, and
lets the cancellation end it quietly, as the server meant it to.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localllm.server.errors import APIError, error_bytes


class StoppingMiddleware:
    def __init__(self, app: ASGIApp, stopping: Callable[[], bool]) -> None:
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self.stopping():
                raise
            if not started:
                error = APIError(503, "the server is stopping; retry when it is back", code="server_stopping")
                try:
                    await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": error_bytes(scope["path"], error)})
                except Exception:
                    pass  # the connection is already gone
