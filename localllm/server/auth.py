"""API keys: every route but the health check asks for `Authorization: Bearer KEY`.

The OpenAI SDK sends its `api_key` that way; Ollama clients take the same header
through their `headers=` argument; `X-API-Key: KEY` (the Anthropic SDK's way)
is accepted too. Keys are
compared in constant time (over their SHA-256, so not even the length leaks).
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from localllm.core.errors import BadRequest
from localllm.server.errors import APIError, error_bytes

OPEN_PATHS = frozenset({"/health", "/"})


MAX_KEY_FILE_LINE = 4096


def read_key_file(path: str) -> str:
    """The key on a file's first line (stripped): a key kept off the command line, where
    every local user could read it in the process list."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline(MAX_KEY_FILE_LINE).strip()
    except OSError as exc:
        raise BadRequest(f"cannot read --api-key-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BadRequest(f"--api-key-file {path} is not UTF-8 text") from None
    if not key:
        raise BadRequest(f"--api-key-file {path} is empty: put the key on its first line")
    return key


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key if isinstance(key, bytes) else key.encode("utf-8")).digest()


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, if any."""
    for name, value in headers:
        lower = name.lower()
        if lower == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif lower == b"x-api-key" and value.strip():
            return value.strip()
    return None


def key_matches(presented: bytes | None, expected_digest: bytes) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(_digest(presented), expected_digest)


class APIKeyMiddleware:
    """Answers 401 before any route runs when the key is missing or wrong."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = _digest(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)  # OPTIONS: browsers send CORS preflights without keys
            return
        presented = presented_key(scope["headers"])
        if key_matches(presented, self._expected):
            await self.app(scope, receive, send)
            return
        message = "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'" if presented is None else "invalid API key"
        error = APIError(401, message, code="invalid_api_key")
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": error_bytes(scope["path"], error)})
