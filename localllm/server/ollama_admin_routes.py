"""Ollama's model management: copy, delete, create, blobs, and a clear refusal for push.

Open WebUI's admin pages and Ollama's clients manage models through these:

* `POST /api/copy` installs a second name for a model (a manifest naming the same files);
* `DELETE /api/delete` uninstalls one, as `localllm rm` does, after unloading it. A model
  that requests are running on (or that is loading, or that the chat holds) is not
  deleted under them: 409, retry once they finish;
* `HEAD`/`POST /api/blobs/sha256:<hex>` ask for and upload a file, checked against its digest;
* `POST /api/create` makes a model from an uploaded GGUF (`files`) or an installed model
  (`from`), with its own chat template, system prompt and parameters (the manifest keeps
  them; see store.py). The work is done before the reply starts, so every refusal is an
  HTTP status; the progress lines then say what was done, ending with `success`.

Uploads are not held to the JSON body limit (limits.py) but to the free disk space.
"""

from __future__ import annotations

import errno
import json
import logging
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from localllm.core.chat_template import resolve_template
from localllm.core.errors import BadModelFile, BadRequest
from localllm.core.modelinfo import ModelInfo, read_model_info
from localllm.server.errors import APIError
from localllm.server.json_bodies import OffLoopBodyRoute
from localllm.server.offloop import in_thread
from localllm.server.ollama_routes import _options
from localllm.server.registry import ModelRegistry, canonical_name, check_model_name
from localllm.server.schemas import OllamaOptions
from localllm.server.state import ServerState
from localllm.store.blobs import BlobStore, parse_digest
from localllm.store.store import Manifest

router = APIRouter(route_class=OffLoopBodyRoute)
log = logging.getLogger("localllm.server")

NDJSON = "application/x-ndjson"
UPLOAD_WRITE_BYTES = 1 << 20  # chunks gathered per write on a worker thread
PUSH_REFUSED = "pushing models to a registry is not supported; models come from the Hugging Face hub (localllm pull)"


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class DeleteRequest(BaseModel):
    """`model`, or `name` as older clients send it."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, min_length=1)


class CreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, min_length=1)
    from_: str | None = Field(default=None, alias="from", min_length=1)
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    license: str | list[str] | None = None
    messages: list[Any] | None = None
    modelfile: str | None = None
    quantize: str | None = None
    stream: bool | None = True


def _state(request: Request) -> ServerState:
    return request.app.state.localllm


def _ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n"


def _name(text: str, field: str) -> str:
    name = canonical_name(text)
    try:
        check_model_name(name)
    except BadRequest as exc:
        raise APIError(400, str(exc).replace("'model'", f"'{field}'", 1), param=field) from None
    return name


async def _installed(registry: ModelRegistry, name: str) -> Manifest | None:
    """The manifest of installed model `name`, None if there is none (a name too long for a file included)."""
    try:
        return await in_thread(registry.store.get, name)
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL):
            return None
        raise


async def _make_room(registry: ModelRegistry, name: str) -> None:
    """Unload `name` so its files can go; 409 while requests run on it, it loads, or the chat holds it."""
    if name in registry.loading:
        raise APIError(409, f"model '{name}' is loading; retry once it is loaded")
    for model in registry.loaded():
        if model.name == name and not model.idle:
            raise APIError(409, f"model '{name}' is in use ({model.in_flight} requests running, {model.holders} holders); retry when they finish")
    await registry.unload(name)  # idle: unloaded now (nothing awaited since the check)


# -- copy and delete ---------------------------------------------------------------------


@router.post("/api/copy")
async def copy(body: CopyRequest, request: Request) -> Response:
    registry = _state(request).registry
    source, destination = _name(body.source, "source"), _name(body.destination, "destination")
    if await _installed(registry, source) is None:
        raise APIError(404, f"model '{source}' is not installed", param="source", code="model_not_found")
    if source != destination:
        await in_thread(registry.store.check_new_name, destination)  # before anything is unloaded
        await _make_room(registry, destination)
        await in_thread(registry.store.copy, source, destination)
        log.info("copied '%s' to '%s'", source, destination)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(body: DeleteRequest, request: Request) -> Response:
    registry = _state(request).registry
    given = body.model or body.name
    if not given:
        raise APIError(400, "'model' is required", param="model")
    name = _name(given, "model")
    if await _installed(registry, name) is None:
        raise APIError(404, f"model '{name}' not found", param="model", code="model_not_found")
    await _make_room(registry, name)
    await in_thread(registry.store.remove, name)
    registry.forget(name)
    log.info("deleted '%s'", name)
    return Response(status_code=200)


# -- blobs -------------------------------------------------------------------------------


def _blob_hex(digest: str) -> str:
    try:
        return parse_digest(digest)
    except BadRequest as exc:
        raise APIError(400, str(exc)) from None


@router.head("/api/blobs/{digest}")
async def has_blob(digest: str, request: Request) -> Response:
    blobs = BlobStore(_state(request).registry.store.paths)
    return Response(status_code=200 if await in_thread(blobs.has, _blob_hex(digest)) else 404)


@router.post("/api/blobs/{digest}")
async def upload_blob(digest: str, request: Request) -> Response:
    hex_digest = _blob_hex(digest)
    blobs = BlobStore(_state(request).registry.store.paths)
    free = await in_thread(blobs.free_bytes)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > free:
        raise APIError(507, f"the upload ({int(declared)} bytes) is larger than the free disk space ({free} bytes)")
    upload = await in_thread(blobs.upload, hex_digest)
    try:
        pending: list[bytes] = []
        pending_bytes = 0
        async for chunk in request.stream():
            if upload.size + pending_bytes + len(chunk) > free:
                raise APIError(507, f"the upload is larger than the free disk space ({free} bytes); nothing was kept")
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= UPLOAD_WRITE_BYTES:
                await in_thread(upload.write, b"".join(pending))
                pending, pending_bytes = [], 0
        await in_thread(upload.write, b"".join(pending))
        await in_thread(upload.finish)
    except BadRequest as exc:
        raise APIError(400, str(exc)) from None
    except ClientDisconnect:
        return Response(status_code=499)  # the client is gone: nothing kept, nobody to answer
    finally:
        upload.abort()  # a finished upload has nothing left to drop; anything else leaves no partial file
    log.info("received blob sha256:%s (%d bytes)", hex_digest, upload.size)
    return Response(status_code=201)


# -- create and push ---------------------------------------------------------------------


@router.post("/api/create")
async def create(body: CreateRequest, request: Request) -> Response:
    registry = _state(request).registry
    given = body.model or body.name
    if not given:
        raise APIError(400, "'model' is required", param="model")
    name = _name(given, "model")
    _refuse_unsupported(body)
    parameters = _checked_parameters(body.parameters, name)
    license_text = "\n".join(body.license) if isinstance(body.license, list) else body.license
    overrides = {"template": body.template, "system": body.system, "parameters": parameters, "license": license_text}
    if body.from_:
        steps = await _create_from_model(registry, name, _name(body.from_, "from"), overrides)
    else:
        steps = await _create_from_files(registry, name, body.files or {}, overrides)
    steps += ["writing manifest", "success"]
    log.info("created '%s'", name)
    if body.stream is False:
        return JSONResponse({"status": "success"})

    async def lines() -> AsyncIterator[bytes]:
        for step in steps:
            yield _ndjson({"status": step})

    return StreamingResponse(lines(), media_type=NDJSON)


def _refuse_unsupported(body: CreateRequest) -> None:
    if body.quantize:
        raise APIError(400, "'quantize' is not supported: pull the quantization you want (`localllm pull`)", param="quantize")
    if body.adapters:
        raise APIError(400, "'adapters' (LoRA) are not supported by this server", param="adapters")
    if body.messages:
        raise APIError(400, "'messages' in a model are not supported by this server", param="messages")
    if body.modelfile:
        raise APIError(400, "'modelfile' text is not supported; send 'from' or 'files' with 'template', 'system' and 'parameters'", param="modelfile")
    if bool(body.from_) == bool(body.files):
        raise APIError(400, "send either 'from' (an installed model) or 'files' (an uploaded GGUF), not both or neither")


def _checked_parameters(parameters: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Ollama options a request could send, checked the same way; unknown names are refused here."""
    if not parameters:
        return {}
    try:
        options = OllamaOptions.model_validate(parameters)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"'parameters.{where}': {first['msg']}", param=f"parameters.{where}") from None
    if options.model_extra:
        raise APIError(400, f"unknown parameter '{sorted(options.model_extra)[0]}'", param="parameters")
    _options(options, name)  # the values a request would be refused for
    return options.model_dump(exclude_none=True)


def _check_template(template: str | None, info: ModelInfo, name: str) -> None:
    """A template must render a simple chat now, not fail on the model's first request (run off the loop)."""
    if not template:
        return
    if "{{ ." in template or "{{." in template:
        raise APIError(400, "'template' looks like a Go template; this server takes Jinja chat templates (as GGUF files carry)", param="template")
    chat = resolve_template(template, info.architecture, model_name=name, bos_token=info.bos_token, eos_token=info.eos_token)
    chat.render([{"role": "user", "content": "hello"}])  # a TemplateError is a 400


async def _create_from_model(registry: ModelRegistry, name: str, source: str, overrides: dict[str, Any]) -> list[str]:
    base = await _installed(registry, source)
    if base is None:
        raise APIError(404, f"model '{source}' is not installed", param="from", code="model_not_found")
    resolved = await in_thread(registry.store.resolve, source)
    await in_thread(_check_template, overrides["template"], await in_thread(resolved.info), name)
    await _make_room(registry, name)  # a model made again in place takes its new settings at its next load
    await in_thread(registry.store.copy, source, name, **overrides)
    return [f"using existing layer sha256:{base.sha256}"]


async def _create_from_files(registry: ModelRegistry, name: str, files: dict[str, str], overrides: dict[str, Any]) -> list[str]:
    if len(files) != 1:
        raise APIError(400, f"'files' must name exactly one GGUF file (got {len(files)})", param="files")
    ((file_name, digest),) = files.items()
    hex_digest = _blob_hex(digest)
    blobs = BlobStore(registry.store.paths)
    if not await in_thread(blobs.has, hex_digest):
        raise APIError(400, f"blob sha256:{hex_digest} has not been uploaded; POST it to /api/blobs/sha256:{hex_digest} first", param="files")
    try:
        info = await in_thread(read_model_info, blobs.path(hex_digest))
    except BadModelFile as exc:
        reason = str(exc).replace(str(blobs.path(hex_digest)), "the upload")  # no server paths in replies
        raise APIError(400, f"'{file_name[:80]}' is not a model file llama.cpp can read: {reason}", param="files") from None
    await in_thread(_check_template, overrides["template"], info, name)
    await _make_room(registry, name)
    await in_thread(blobs.install, registry.store, name, hex_digest, file_name, **overrides)
    return ["parsing GGUF", f"using layer sha256:{hex_digest}"]


@router.post("/api/push")
async def push() -> Response:
    raise APIError(400, PUSH_REFUSED)
