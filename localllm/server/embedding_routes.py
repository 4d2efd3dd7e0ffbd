"""Embeddings: OpenAI's /v1/embeddings, Ollama's /api/embed and its older /api/embeddings.

A request leases its model like a chat does (a model loaded for chat embeds
too), has the backend tokenize and check its inputs off the event loop, and
awaits the vectors, which the engine computes batched with other requests'
inputs (backends/llamacpp_embedder.py). Vectors are unit length, as Ollama's
/api/embed returns them; `dimensions` keeps the first N values and
normalises again, as OpenAI's matryoshka models do.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from typing import Any, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from localllm.core.errors import BadRequest
from localllm.server.errors import APIError
from localllm.server.generation import ClientGone, until_disconnected
from localllm.server.json_bodies import OffLoopBodyRoute
from localllm.server.offloop import off_loop
from localllm.server.prompt_limits import CHARS_PER_TOKEN
from localllm.server.registry import _KEEP, Lease
from localllm.server.schemas import EmbeddingRequest, KeepAlive
from localllm.server.settings import parse_duration
from localllm.server.state import ServerState

router = APIRouter(route_class=OffLoopBodyRoute)

MAX_INPUTS = 2048  # inputs per request, as OpenAI allows


class OllamaEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    input: Union[str, list[str]] = Field(default_factory=list)
    truncate: bool | None = None  # Ollama's default: cut inputs to the context
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class OllamaEmbeddingsRequest(BaseModel):
    """The older /api/embeddings: one `prompt`, one `embedding`."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str = ""
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


def _state(request: Request) -> ServerState:
    return request.app.state.localllm


# -- OpenAI ------------------------------------------------------------------------------


@router.post("/v1/embeddings")
async def openai_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    inputs = _openai_inputs(body.input)
    state = _state(request)
    lease = await state.registry.acquire(body.model)
    try:
        tokens, vectors = await _embed(lease, request, inputs, truncate=False, param="input")
    finally:
        lease.release()
    vectors = _shorten(vectors, body.dimensions)
    encode = _base64 if body.encoding_format == "base64" else (lambda v: v)
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    used = sum(len(t) for t in tokens)
    state.metrics.prompt_tokens.inc(used)
    return JSONResponse(
        {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": used, "total_tokens": used}}
    )


def _openai_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """One list of inputs: a string, strings, one token list or token lists."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise APIError(400, "'input' must not be empty", param="input")
    if all(isinstance(v, int) for v in value):
        value = [value]  # type: ignore[list-item]
    if len(value) > MAX_INPUTS:
        raise APIError(400, f"'input' has {len(value)} items; at most {MAX_INPUTS}", param="input")
    for i, item in enumerate(value):
        if isinstance(item, (str, list)) and not item:
            raise APIError(400, f"'input[{i}]' must not be empty", param="input")
    return value  # type: ignore[return-value]


def _base64(vector: list[float]) -> str:
    """Little-endian float32s in base64, as OpenAI sends them."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# -- Ollama ------------------------------------------------------------------------------


@router.post("/api/embed")
async def ollama_embed(body: OllamaEmbedRequest, request: Request) -> Response:
    started = time.perf_counter()
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"'input' has {len(inputs)} items; at most {MAX_INPUTS}")
    lease = await _ollama_lease(request, body.model, body.keep_alive, body.options)
    try:
        tokens, vectors = await _embed(lease, request, inputs, truncate=body.truncate is not False, param="input")
        load_s = lease.load_s
    finally:
        lease.release()
    vectors = _shorten(vectors, body.dimensions)
    used = sum(len(t) for t in tokens)
    _state(request).metrics.prompt_tokens.inc(used)
    return JSONResponse({
        "model": body.model,
        "embeddings": vectors,
        "total_duration": _ns(time.perf_counter() - started),
        "load_duration": _ns(load_s),
        "prompt_eval_count": used,
    })


@router.post("/api/embeddings")
async def ollama_embeddings(body: OllamaEmbeddingsRequest, request: Request) -> Response:
    lease = await _ollama_lease(request, body.model, body.keep_alive, body.options)
    try:
        inputs = [body.prompt] if body.prompt else []  # an empty prompt only loads the model, as in Ollama
        _, vectors = await _embed(lease, request, inputs, truncate=True, param="prompt")
    finally:
        lease.release()
    return JSONResponse({"embedding": vectors[0] if vectors else []})


async def _ollama_lease(request: Request, model: str, keep_alive: Any, options: dict[str, Any] | None) -> Lease:
    """The model, loaded with `num_ctx` if asked; other options do not change an embedding and are ignored."""
    num_ctx = (options or {}).get("num_ctx")
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1):
        raise APIError(400, "option 'num_ctx' must be a positive integer")
    keep = _KEEP
    if keep_alive is not None:
        try:
            keep = parse_duration(keep_alive)
        except BadRequest as exc:
            raise APIError(400, str(exc)) from None
    lease = await _state(request).registry.acquire(model, n_ctx=num_ctx)
    if keep is not _KEEP:
        lease.keep_alive_s = keep
    return lease


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


# -- shared ------------------------------------------------------------------------------


async def _embed(
    lease: Lease, request: Request, inputs: list[str] | list[list[int]], *, truncate: bool, param: str
) -> tuple[list[list[int]], list[list[float]]]:
    """The inputs' tokens and unit vectors; checks and tokenizing run off the event loop."""
    if not inputs:
        return [], []
    backend = lease.backend
    if backend.embed_context is None:  # a backend that cannot embed says so
        await off_loop(backend.prepare_embedding, inputs)
        raise APIError(400, f"model '{lease.model.name}' cannot compute embeddings", param="model")
    try:
        tokens = await off_loop(backend.prepare_embedding, _cut_texts(inputs, backend.embed_context, truncate, param), truncate=truncate)
    except BadRequest as exc:
        raise APIError(400, str(exc), param=param) from None
    try:
        vectors = await until_disconnected(request, backend.embed(tokens))
    except ClientGone:
        raise APIError(499, "the client went away") from None
    return tokens, vectors


def _cut_texts(inputs: list[Any], context: int | None, truncate: bool, param: str) -> list[Any]:
    """Texts longer than any `context`-token input can be: cut (truncate) or refused, before tokenizing."""
    if context is None:
        return inputs
    limit = context * CHARS_PER_TOKEN  # no token is longer than this many characters
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str) and len(item) > limit:
            if not truncate:
                raise APIError(
                    400,
                    f"input[{i}] has {len(item)} characters, more than an input of {context} tokens can hold; shorten it",
                    param=param,
                )
            item = item[:limit]
        out.append(item)
    return out


def _shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """The first `dimensions` values of each vector, normalised again; a 400 naming `dimensions` past the width."""
    if dimensions is None or not vectors:
        return vectors
    width = len(vectors[0])
    if dimensions > width:
        raise APIError(400, f"'dimensions' is {dimensions} but this model's embeddings have {width}", param="dimensions")
    shortened = []
    for vector in vectors:
        part = vector[:dimensions]
        norm = math.sqrt(sum(v * v for v in part))
        shortened.append([v / norm for v in part] if norm > 0 else part)
    return shortened
