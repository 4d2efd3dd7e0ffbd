"""Request bodies: a size limit, and JSON whatever the Content-Type says.

A body over the limit is refused with 413 before it is read when it declares
its length, and as soon as it passes the limit when it is chunked. Ollama's and
llama.cpp's servers read any body as JSON (`curl -d '{...}'` sends a form
content type), so API routes do too. Blob uploads (/api/blobs/) are files, not
JSON: they are held to the free disk space instead (ollama_admin_routes.py).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localllm.server.errors import APIError, error_bytes


UPLOAD_PATH = "/api/blobs/"


class BodyTooLarge(HTTPException):
    """Raised from `receive` mid-body; FastAPI passes HTTPExceptions through to the handlers."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the {limit}-byte limit")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UPLOAD_PATH):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH") and b"json" not in headers.get(b"content-type", b""):
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))

        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted_receive, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        error = APIError(413, f"the request body is larger than the {self.max_bytes}-byte limit")
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": error_bytes(scope["path"], error)})
