"""Request bodies parsed and validated off the event loop, with cheap refusals first.

FastAPI parses a route's JSON body and validates it against the route's model
on the event loop; for a body of megabytes (hundreds of thousands of
messages) that stalls every other connection. Routes of `OffLoopBodyRoute`
get a Request whose `json()` does both on a worker thread (offloop.py) and
hands FastAPI the validated model, which FastAPI then accepts as it is.
Before validation, two refusals that need only the parsed JSON:

* text that is not valid Unicode (a lone surrogate such as "\\ud800") would
  fail later, in a tokenizer or a reply, as a 500;
* more messages than prompt_limits.MAX_MESSAGES cannot fit any context.

A body that fails validation is refused here too, worded as FastAPI's
errors are (errors.validation_message).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Coroutine

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from localllm.server.errors import validation_message
from localllm.server.offloop import off_loop
from localllm.server.prompt_limits import MAX_MESSAGES

SMALL_BODY_BYTES = 64 * 1024  # parsed on the loop: a thread hop would cost more than the parse
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BodyRefused(HTTPException):
    """A 400 raised while reading the body (FastAPI passes HTTPExceptions through to the handlers)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message)
        self.param = param


def parse_body(raw: bytes, model: type[BaseModel] | None) -> Any:
    """The body as `model`; BodyRefused for bad text, too many messages or a body `model` refuses."""
    data = json.loads(raw)
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(data, "")
        if where is not None:
            raise BodyRefused(f"{where or 'the body'}: text must be valid Unicode (found a lone surrogate such as \\ud800)")
    if isinstance(data, dict) and isinstance(data.get("messages"), list) and len(data["messages"]) > MAX_MESSAGES:
        raise BodyRefused(f"too many messages: {len(data['messages'])}; at most {MAX_MESSAGES} (the server's limit)")
    if model is None or not isinstance(data, dict):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # worded here, as FastAPI would, so it is not validated again on the loop
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        message, param = validation_message(RequestValidationError(errors))
        raise BodyRefused(message, param) from None


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (key or value) holding a lone surrogate, or None."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not _encodes(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _encodes(key):
                    return where or "a key"
                stack.append((child, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class OffLoopBodyRequest(Request):
    body_model: type[BaseModel] | None = None

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            raw = await self.body()
            if len(raw) <= SMALL_BODY_BYTES:
                self._json = parse_body(raw, self.body_model)
            else:
                self._json = await off_loop(parse_body, raw, self.body_model)
        return self._json


class OffLoopBodyRoute(APIRoute):
    """An APIRoute whose JSON body is parsed and validated on a worker thread."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        annotation = self.body_field.field_info.annotation if self.body_field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None

        async def off_loop_body(request: Request) -> Response:
            wrapped = OffLoopBodyRequest(request.scope, request.receive, request._send)
            wrapped.body_model = model
            return await handler(wrapped)

        return off_loop_body
