"""Every failure as an HTTP error in the caller's own dialect.

OpenAI clients expect `{"error": {"message", "type", "param", "code"}}`;
Ollama clients expect `{"error": "..."}`; Anthropic clients expect
`{"type": "error", "error": {"type", "message"}}`. Which one a request gets
follows from its path: `/api/...` is Ollama's, `/v1/messages...` Anthropic's,
everything else OpenAI's. Errors are
values (localllm.core.errors) until they reach this module; no response ever
carries a stack trace, and the server log keeps the one of an unexpected error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from localllm.core.errors import (
    AccessDenied,
    BadModelFile,
    BadRequest,
    DoesNotFit,
    DownloadFailed,
    HubUnreachable,
    LocalLLMError,
    ModelNotFound,
    NoChatTemplate,
    NotEnoughDisk,
    PromptTooLong,
    QueueFull,
    TemplateError,
    UpstreamRefused,
    UpstreamUnavailable,
)

# OpenAI's `type` for each status we send (OpenAI itself answers 401 and 404 as invalid requests).
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    507: "server_error",
}

# Anthropic's `type` for each status we send.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


@dataclass
class APIError(Exception):
    """An HTTP error raised by route code; rendered by `error_response`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(path: str, error: APIError) -> dict[str, Any]:
    if is_ollama_path(path):
        return {"error": error.message}
    if is_anthropic_path(path):
        return {"type": "error", "error": {"type": anthropic_error_type(error.status), "message": error.message}}
    return {
        "error": {
            "message": error.message,
            "type": _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error"),
            "param": error.param,
            "code": error.code,
        }
    }


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_response(path: str, error: APIError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status, headers=error.headers or None)


def error_bytes(path: str, error: APIError) -> bytes:
    """The body of an error sent from ASGI middleware (no Request object there)."""
    return json.dumps(error_body(path, error)).encode()


def from_localllm_error(exc: LocalLLMError) -> APIError:
    """The HTTP status for each kind of failure (localllm.core.errors)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, QueueFull):
        return APIError(429, message, code="queue_full", headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ModelNotFound):
        return APIError(404, message, param="model", code="model_not_found")
    if isinstance(exc, UpstreamRefused):  # the upstream's own 4xx, passed through
        return APIError(exc.status, message, code=exc.code)
    if isinstance(exc, (BadRequest, TemplateError)):
        return APIError(400, message)
    if isinstance(exc, AccessDenied):
        return APIError(403, message)
    if isinstance(exc, NotEnoughDisk):
        return APIError(507, message)
    if isinstance(exc, HubUnreachable):
        return APIError(502, message)
    if isinstance(exc, UpstreamUnavailable):  # the remote backend's server is down, refused or timed out
        return APIError(502, message, code="upstream_unavailable")
    if isinstance(exc, (DoesNotFit, BadModelFile, DownloadFailed)):
        return APIError(500, message)
    return APIError(500, message)  # BackendError and anything new: the server's side failed


# The request field that carries the prompt, by path: what a too-long prompt's error names.
_PROMPT_FIELDS = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/messages": "messages",
    "/api/chat": "messages",
    "/api/generate": "prompt",
    "/v1/responses": "input",
}


def for_request(exc: LocalLLMError, path: str) -> APIError:
    """`exc` worded for a request to `path`: errors that carry facts name that API's own fields."""
    if isinstance(exc, PromptTooLong):
        field = _PROMPT_FIELDS.get(path, "prompt")
        room = f"shorten '{field}'"
        if is_ollama_path(path):
            room += " or raise 'options.num_ctx'"  # Ollama clients choose the context per request
        message = f"the prompt has {exc.prompt_tokens} tokens but the model's context holds {exc.context}; {room}"
        return APIError(400, message, param=field, code="context_length_exceeded")
    if isinstance(exc, NoChatTemplate):
        raw = "/api/generate with 'raw': true" if is_ollama_path(path) else "/v1/completions"
        return APIError(400, f"{exc}; send a raw prompt to {raw}", param="model")
    return from_localllm_error(exc)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first problem pydantic found, and the parameter it concerns."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = _most_specific(errors)
    loc = list(first.get("loc", ()))
    if loc[:1] == ["body"]:
        loc = loc[1:]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON{': ' + detail if detail else ''}", None
    param = param_name(loc)
    if kind == "missing" and param is None:
        return "the request body must be a JSON object", None
    if kind == "missing":
        return f"'{param}' is required", param
    if kind == "extra_forbidden":
        return f"unrecognized request argument '{param}'", param
    if not loc:
        return "the request body must be a JSON object", None
    msg = str(first.get("msg", "is invalid"))
    return f"'{param}': {msg[0].lower() + msg[1:] if msg else 'is invalid'}", param


# How pydantic tags the member of a union it tried: `str`, `list[...]`, `literal['a','b']`,
# `function-after[...]`, or a model's class name. They are not part of the client's field path.
_UNION_TAG = re.compile(r"^(?:[a-z][a-z0-9_-]*\[.*\]|str|int|float|bool|none|dict|list|[A-Z][A-Za-z0-9]*)$", re.DOTALL)


def _most_specific(errors: list[Any]) -> Any:
    """Of the errors pydantic reports for the first bad field, the deepest one.

    A union field (`tool_choice`) gets one error per member it tried; the one
    that went deepest (`tool_choice.function` is required) says most.
    """
    first = errors[0]
    loc = list(first.get("loc", ()))
    cut = next((i for i, part in enumerate(loc) if i and isinstance(part, str) and _UNION_TAG.match(part)), len(loc))
    same_field = [e for e in errors if list(e.get("loc", ()))[:cut] == loc[:cut]]
    return max(same_field, key=lambda e: len(e.get("loc", ())))


def param_name(loc: list[Any]) -> str | None:
    """A field path the way the client wrote it: `messages[0].content`, never `messages.0.content.str`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _UNION_TAG.match(part) and out:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(LocalLLMError)
    async def _localllm_error(request: Request, exc: LocalLLMError) -> JSONResponse:
        return error_response(request.url.path, for_request(exc, request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(request.url.path, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        param = getattr(exc, "param", None)  # json_bodies.BodyRefused names the field
        return error_response(request.url.path, APIError(exc.status_code, detail, param=param, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after sending this, so uvicorn logs the traceback (server side only).
        message = f"internal error ({type(exc).__name__}); the server log has the details"
        return error_response(request.url.path, APIError(500, message))
