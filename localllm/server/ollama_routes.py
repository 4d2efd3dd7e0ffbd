"""Ollama's API, so tools built for Ollama work: chat, generate, tags, show, ps, pull, version.

Streaming is NDJSON (one JSON object per line) and is on unless `stream` is
false, as in Ollama. Errors are `{"error": "..."}`; an error after a stream has
begun is sent as such a line, which Ollama's clients raise. Durations are in
nanoseconds. Options we cannot honour are refused by name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from localllm import __version__
from localllm.core.reasoning import ReplyReasoning, thinking_switch
from localllm.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from localllm.core.errors import BadRequest, LocalLLMError
from localllm.server.logprobs import token_logprobs
from localllm.server.capabilities import capabilities, refuse_unsupported_tools, stop_tokens, used_template
from localllm.server.errors import APIError, from_localllm_error
from localllm.server.generation import (
    ClientGone,
    EventStreamResponse,
    Run,
    collect,
    guarded,
    new_id,
    start_run,
    until_disconnected,
)
from localllm.server.json_bodies import OffLoopBodyRoute
from localllm.server.json_grammar import json_object_grammar, schema_grammar
from localllm.server.model_parameters import parameters_text, with_model_parameters
from localllm.server.offloop import in_thread, off_loop
from localllm.server.prompt_limits import check_message_count, check_prompt_chars, text_chars
from localllm.server.registry import _KEEP, Lease, LoadedModel, check_model_name
from localllm.server.schemas import (
    JsonFormat,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaModelRequest,
    OllamaOptions,
)
from localllm.server.settings import parse_duration
from localllm.server.state import ServerState
from localllm.server.tools import ToolCall, ToolPlan, plan_tools
from localllm.core.units import human_count

router = APIRouter(route_class=OffLoopBodyRoute)
log = logging.getLogger("localllm.server")

NDJSON = "application/x-ndjson"
# Ollama's documented options that this server does not apply per request: loading and
# hardware settings are the server's (--threads, --ctx; one engine serves every request),
# and llama.cpp samplers we do not offer. They are accepted, as Ollama accepts them, and
# the server log says once per request which were ignored. The values listed change nothing.
# num_thread and num_gpu (LOAD_OPTIONS) apply when the request loads the model; a model
# loaded already keeps its settings (no engine changes them without a reload) and they are logged.
OPTIONS_IGNORED: dict[str, Any] = {
    "num_keep": None,
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "penalize_newline": None,
    "mirostat": 0,
    "mirostat_tau": None,
    "mirostat_eta": None,
    "numa": None,
    "num_batch": None,
    "main_gpu": None,
    "low_vram": None,
    "f16_kv": None,
    "logits_all": None,
    "vocab_only": None,
    "use_mmap": None,
    "use_mlock": None,
}
LOAD_OPTIONS = {"num_thread": "n_threads", "num_gpu": "n_gpu_layers"}  # Ollama's name -> LoadOptions field
_NEVER = "2318-08-30T00:00:00Z"  # Ollama's "expires_at" for a model that never unloads (year 2318)


def _state(request: Request) -> ServerState:
    return request.app.state.localllm


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n"


def _error_line(message: str) -> bytes:
    return _ndjson({"error": message})


# -- small routes ----------------------------------------------------------------------


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    state = _state(request)
    models = []
    for manifest in state.registry.store.list():
        models.append(
            {
                "name": manifest.name,
                "model": manifest.name,
                "modified_at": manifest.added,
                "size": manifest.size,
                "digest": manifest.sha256,
                "details": _details(manifest.info or {}, manifest.format),
            }
        )
    return {"models": models}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"models": [_loaded_entry(m) for m in state.registry.loaded()]}


def _loaded_entry(model: LoadedModel) -> dict[str, Any]:
    info = model.backend.info
    manifest = model.resolved.manifest
    expires = model.expires_at()
    return {
        "name": model.name,
        "model": model.name,
        "size": info.size_bytes,
        "digest": manifest.sha256 if manifest else "",
        "details": _details(info.to_dict(), info.format),
        "expires_at": expires.isoformat().replace("+00:00", "Z") if expires else _NEVER,
        "size_vram": 0,
        "context_length": model.n_ctx,
    }


@router.post("/api/show")
async def show(body: OllamaModelRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    name = body.model_name()
    if not name:
        raise APIError(400, "'model' is required", param="model")
    resolved = await state.registry.find(name)
    info = await off_loop(resolved.info)  # a model without cached facts: its GGUF header is read
    template = used_template(info)  # the model's own, else the built-in one it is rendered with
    arch = info.architecture
    model_info = {
        "general.architecture": arch,
        "general.name": info.model_name,
        "general.parameter_count": info.parameters,
        "general.quantization": info.quantization,
        f"{arch}.context_length": info.context_length,
        f"{arch}.block_count": info.n_layers,
        f"{arch}.embedding_length": info.hidden_size,
        f"{arch}.attention.head_count": info.n_heads,
        f"{arch}.attention.head_count_kv": info.n_kv_heads,
        f"{arch}.attention.key_length": info.head_dim,
        f"{arch}.attention.sliding_window": info.sliding_window,
        "tokenizer.ggml.bos_token_id": info.bos_token_id,
        "tokenizer.ggml.eos_token_id": info.eos_token_id,
        "tokenizer.ggml.vocab_size": info.vocab_size,
    }
    manifest = resolved.manifest
    parameters = {"stop": stop_tokens(info), **(manifest.parameters if manifest else {})}
    return {
        "license": (manifest.license if manifest else None) or "",
        "modelfile": _modelfile(resolved.name, template, info.system_prompt, parameters),
        "parameters": parameters_text(parameters),
        "system": info.system_prompt or "",
        "template": template or "",
        "details": _details(info.to_dict(), info.format),
        "model_info": model_info,
        "capabilities": capabilities(info),
        "modified_at": resolved.manifest.added if resolved.manifest else _now(),
    }


def _modelfile(name: str, template: str, system: str | None, parameters: dict[str, Any]) -> str:
    """The model as an Ollama Modelfile: where it comes from, its template, system prompt and parameters."""
    lines = [f"# Modelfile generated by localllm {__version__}", f"FROM {name}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for key, value in sorted(parameters.items()):
        lines += [f"PARAMETER {key} {one}" for one in (value if isinstance(value, list) else [value])]
    return "\n".join(lines) + "\n"


def _details(info: dict[str, Any], fmt: str) -> dict[str, Any]:
    arch = info.get("architecture") or ""
    params = info.get("parameters")
    return {
        "parent_model": "",
        "format": fmt,
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": human_count(params) if params else "",
        "quantization_level": info.get("quantization") or "",
    }


# -- generation --------------------------------------------------------------------------


@dataclass
class _Reply:
    """A generation in flight and what its reply needs (chat and generate share it)."""

    lease: Lease
    run: Run
    tools: ToolPlan | None
    started: float
    model: str
    logprobs: bool
    reasoning: ReplyReasoning


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request) -> Response:
    state = _state(request)
    for name in ("suffix", "template"):
        if getattr(body, name):
            raise APIError(400, f"'{name}' is not supported by this server")
    if body.images:
        raise APIError(400, f"model '{body.model}' does not support images")
    if body.context:
        raise APIError(400, "'context' is not supported by this server; send the conversation to /api/chat")
    keep_alive = _keep_alive(body.keep_alive)
    options = await with_model_parameters(state.registry, body.model, body.options)
    params, n_ctx = _options(options, body.model)
    started = time.perf_counter()
    if not body.prompt:
        return await _load_or_unload(state, body.model, keep_alive, n_ctx, "response", options)

    lease = await _acquire(state, body.model, n_ctx, options)
    try:
        if keep_alive is not _KEEP:
            lease.keep_alive_s = keep_alive
        check_prompt_chars(text_chars([body.prompt, body.system]), lease.model.n_ctx, "prompt")
        _logprobs(params, body.logprobs, body.top_logprobs)
        generation, reasoning = await off_loop(_prepare_generate, body, params, lease.backend)
        run = await start_run(lease, generation, state.metrics)
    except BaseException:
        lease.release()
        raise
    reply = _Reply(lease, run, None, started, body.model, bool(body.logprobs), reasoning)
    return await _respond(reply, request, body.stream is not False, "response")


def _prepare_generate(body: OllamaGenerateRequest, params: SamplingParams, backend: Any) -> tuple[GenerationRequest, ReplyReasoning]:
    """Template, grammar and tokens for /api/generate: model work, run off the event loop."""
    template = backend.info.chat_template
    template_vars = thinking_switch(template, _think(body.think), body.model, getattr(backend.info, "reasoning", None))
    messages = None
    if body.raw:
        prompt, templated = body.prompt, False
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}
        ]
        prompt, templated = backend.render_chat(messages, template_vars=template_vars), True
    _format(params, body.format, None)
    reasoning = ReplyReasoning.of(template, prompt, params) if templated else ReplyReasoning()
    generation = GenerationRequest(new_id(), prompt, params, templated=templated, messages=messages, template_vars=template_vars)
    return backend.prepare(generation), reasoning


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request) -> Response:
    state = _state(request)
    keep_alive = _keep_alive(body.keep_alive)
    options = await with_model_parameters(state.registry, body.model, body.options)
    params, n_ctx = _options(options, body.model)
    started = time.perf_counter()
    if not body.messages:
        return await _load_or_unload(state, body.model, keep_alive, n_ctx, "message", options)
    for i, message in enumerate(body.messages):
        if message.images:
            raise APIError(400, f"model '{body.model}' does not support images (messages[{i}].images)")

    lease = await _acquire(state, body.model, n_ctx, options)
    try:
        if keep_alive is not _KEEP:
            lease.keep_alive_s = keep_alive
        check_message_count(len(body.messages), lease.model.n_ctx)
        check_prompt_chars(text_chars(m.content for m in body.messages), lease.model.n_ctx, "messages")
        _logprobs(params, body.logprobs, body.top_logprobs)
        generation, tools, reasoning = await off_loop(_prepare_chat, body, params, lease.backend)
        run = await start_run(lease, generation, state.metrics)
    except BaseException:
        lease.release()
        raise
    reply = _Reply(lease, run, tools, started, body.model, bool(body.logprobs), reasoning)
    return await _respond(reply, request, body.stream is not False, "message")


def _prepare_chat(
    body: OllamaChatRequest, params: SamplingParams, backend: Any
) -> tuple[GenerationRequest, ToolPlan | None, ReplyReasoning]:
    """Tools, template, grammar and tokens for /api/chat: model work, run off the event loop."""
    template_vars = thinking_switch(backend.info.chat_template, _think(body.think), body.model, getattr(backend.info, "reasoning", None))
    tools = plan_tools(
        [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        "auto",
        parallel=True,
        template=backend.info.chat_template,
    )
    tools = refuse_unsupported_tools(tools, body.model)
    messages = [_chat_message(m) for m in body.messages]
    if tools is not None:
        messages = tools.prepare_messages(messages)
    prompt = backend.render_chat(messages, tools=tools.template_tools() if tools else None, template_vars=template_vars)
    _format(params, body.format, tools)
    generation = GenerationRequest(new_id(), prompt, params, templated=True, messages=messages, template_vars=template_vars)
    return backend.prepare(generation), tools, ReplyReasoning.of(backend.info.chat_template, prompt, params)


def _chat_message(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.tool_calls:
        data["tool_calls"] = [{"type": "function", "function": c.function.model_dump()} for c in message.tool_calls]
    if message.tool_name:
        data["name"] = message.tool_name
    return data


async def _respond(reply: _Reply, request: Request, stream: bool, kind: str) -> Response:
    if stream:
        return EventStreamResponse(guarded(_stream(reply, kind), _error_line), NDJSON, reply.run.close)
    try:
        tokens, finish = await collect(reply.run, request)
    except ClientGone:
        return Response(status_code=499)
    if finish.reason == "error":
        raise APIError(500, finish.error or "the engine failed")
    split = reply.reasoning.split("".join(t.text for t in tokens))
    text = split.answer
    content, calls = reply.tools.parse(text, cut=finish.reason == "length") if reply.tools else (text, [])
    body = _head(reply.model, kind, content or "", _whole(calls), thinking=split.reasoning)
    body.update(_final_stats(reply, finish))
    if reply.logprobs:
        body["logprobs"] = token_logprobs(tokens, with_bytes=False)
    return JSONResponse(body)


async def _stream(reply: _Reply, kind: str) -> AsyncIterator[bytes]:
    tool_stream = reply.tools.stream() if reply.tools else None
    thoughts = reply.reasoning.stream()
    async for event in reply.run.events():
        if isinstance(event, TokenEvent):
            answer, thinking = event.text, ""
            if thoughts is not None:
                split = thoughts.feed(event.text)
                answer, thinking = split.answer, split.reasoning
            text = tool_stream.feed(answer) if tool_stream and answer else ("" if tool_stream else answer)
            if text or thinking or (reply.logprobs and event.logprobs):
                line = _head(reply.model, kind, text, [], done=False, thinking=thinking)
                if reply.logprobs and event.logprobs:
                    line["logprobs"] = token_logprobs([event], with_bytes=False)
                yield _ndjson(line)
            continue
        if event.reason == "error":
            yield _ndjson({"error": event.error or "the engine failed"})
            return
        if thoughts is not None:
            split = thoughts.flush()
            answer = tool_stream.feed(split.answer) if tool_stream and split.answer else ("" if tool_stream else split.answer)
            if answer or split.reasoning:
                yield _ndjson(_head(reply.model, kind, answer, [], done=False, thinking=split.reasoning))
        if tool_stream:
            rest, calls = tool_stream.finish(cut=event.reason == "length")
            calls = _whole(calls)
            if rest or calls:
                yield _ndjson(_head(reply.model, kind, rest, calls, done=False))
        final = _head(reply.model, kind, "", [])
        final.update(_final_stats(reply, event))
        yield _ndjson(final)


def _whole(calls: list[ToolCall]) -> list[ToolCall]:
    """The calls Ollama can report: its arguments are objects, so a call cut by num_predict is left out."""
    return [c for c in calls if c.complete]


def _head(model: str, kind: str, text: str, calls: list, *, done: bool = True, thinking: str = "") -> dict[str, Any]:
    head: dict[str, Any] = {"model": model, "created_at": _now()}
    if kind == "message":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [c.ollama() for c in calls]
        head["message"] = message
    else:
        head["response"] = text
        if thinking:
            head["thinking"] = thinking
    head["done"] = done
    return head


def _final_stats(reply: _Reply, finish: FinishEvent) -> dict[str, Any]:
    t, u = finish.timings, finish.usage
    return {
        "done": True,
        "done_reason": "length" if finish.reason == "length" else "stop",
        "total_duration": _ns(time.perf_counter() - reply.started),
        "load_duration": _ns(reply.lease.load_s),
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": _ns(t.prompt_s),
        "eval_count": u.completion_tokens,
        "eval_duration": _ns(t.decode_s),
    }


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


async def _load_or_unload(
    state: ServerState, model: str, keep_alive: Any, n_ctx: int | None, kind: str, options: OllamaOptions | None
) -> Response:
    """An empty prompt loads a model (or, with keep_alive 0, unloads it), as in Ollama."""
    if keep_alive == 0:
        resolved = await state.registry.find(model)  # 404 for unknown names, as for any request
        await state.registry.unload(resolved.name)
        reason = "unload"
    else:
        lease = await _acquire(state, model, n_ctx, options)
        if keep_alive is not _KEEP:
            lease.keep_alive_s = keep_alive
        lease.release()
        reason = "load"
    reply = _head(model, kind, "", [])
    reply["done_reason"] = reason
    return JSONResponse(reply)


def _think(value: bool | str | None) -> bool | None:
    """Ollama's `think`: a boolean, or a level ("low", "medium", "high") that means on."""
    if value is None or isinstance(value, bool):
        return value
    return value.strip().lower() not in ("", "false", "none")


def _keep_alive(value: Any) -> Any:
    if value is None:
        return _KEEP
    try:
        return parse_duration(value)
    except BadRequest as exc:
        raise APIError(400, str(exc)) from None


async def _acquire(state: ServerState, model: str, n_ctx: int | None, options: OllamaOptions | None) -> Lease:
    """The model's lease; num_thread and num_gpu go to its load if this request loads it."""
    load = _load_settings(options)
    lease = await state.registry.acquire(model, n_ctx=n_ctx, load={LOAD_OPTIONS[k]: v for k, v in load.items()})
    if options is not None:
        _log_ignored_options(options, model, [k for k, v in load.items() if lease.model.load.get(LOAD_OPTIONS[k]) != v])
    return lease


def _load_settings(options: OllamaOptions | None) -> dict[str, int]:
    """The request's num_thread and num_gpu, by Ollama's names; 0 threads and a negative num_gpu mean Ollama's "auto": ours."""
    if options is None:
        return {}
    settings = {"num_thread": options.num_thread if options.num_thread and options.num_thread > 0 else None,
                "num_gpu": options.num_gpu if options.num_gpu is not None and options.num_gpu >= 0 else None}
    return {k: v for k, v in settings.items() if v is not None}


def _options(options: OllamaOptions | None, model: str) -> tuple[SamplingParams, int | None]:
    """Ollama's options as sampling parameters, plus the context size asked for."""
    params = SamplingParams()
    if options is None:
        return params, None
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty"):
        value = getattr(options, name)
        if value is not None:
            setattr(params, name, value)
    if options.top_p == 0:
        params.top_p, params.temperature = 1.0, 0.0  # only the most likely token remains
    if options.seed is not None:
        params.seed = None if options.seed < 0 else options.seed % 2**32
    if options.stop is not None:
        params.stop = [options.stop] if isinstance(options.stop, str) else list(options.stop)
    n = options.num_predict
    if n is not None:
        if n > 0:
            params.max_tokens = n
        elif n not in (-1, -2):
            raise APIError(400, "num_predict must be positive, -1 (no limit) or -2 (fill the context)")
    try:
        params.validate()
    except BadRequest as exc:
        raise APIError(400, str(exc)) from None
    return params, options.num_ctx


def _log_ignored_options(options: OllamaOptions, model: str, not_loaded: list[str]) -> None:
    """One server-log line naming the options this request set that nothing here applies
    (`not_loaded`: the LOAD_OPTIONS the model, loaded already, was not loaded with)."""
    ignored = [
        f"{key}={value}"
        for key, neutral in OPTIONS_IGNORED.items()
        if (value := getattr(options, key)) is not None and value != neutral
    ]
    unknown = sorted(options.model_extra or {})
    if not ignored and not unknown and not not_loaded:
        return
    parts = []
    if not_loaded:
        loaded = ", ".join(f"{key}={getattr(options, key)}" for key in not_loaded)
        parts.append(f"{loaded} (they apply when a request loads the model; it was loaded already)")
    if ignored:
        parts.append(f"{', '.join(ignored)} (the server's own settings and samplers apply)")
    if unknown:
        parts.append(f"unknown {', '.join(unknown)}")
    log.warning("request for '%s': options ignored: %s", model, "; ".join(parts)[:500])


def _format(params: SamplingParams, fmt: JsonFormat, tools: ToolPlan | None) -> None:
    if fmt in (None, ""):
        return
    if tools is not None:
        raise APIError(400, "'format' cannot be combined with 'tools'")
    params.grammar = json_object_grammar() if fmt == "json" else schema_grammar(fmt, "format")


def _logprobs(params: SamplingParams, logprobs: bool | None, top: int | None) -> None:
    if logprobs:
        params.logprobs = top or 0
    elif top:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true")


# -- pull ------------------------------------------------------------------------------


@router.post("/api/pull")
async def pull(body: OllamaModelRequest, request: Request) -> Response:
    state = _state(request)
    ref = body.model_name()
    if not ref:
        raise APIError(400, "'model' is required", param="model")
    check_model_name(ref)
    from localllm.fit.hub_model import pull_with_plan
    from localllm.store.progress import PullProgress

    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[PullProgress] = asyncio.Queue()
    cancel = threading.Event()

    def progress(update: PullProgress) -> None:
        loop.call_soon_threadsafe(updates.put_nowait, update)

    job = asyncio.ensure_future(
        in_thread(pull_with_plan, ref.strip(), store=state.registry.store, progress=progress, cancel=cancel)
    )
    job.add_done_callback(lambda done: done.cancelled() or done.exception())  # never "unretrieved"
    if body.stream is False:
        try:
            await until_disconnected(request, asyncio.shield(job))
        except ClientGone:
            cancel.set()
            return Response(status_code=499)
        return JSONResponse({"status": "success"})

    async def lines() -> AsyncIterator[bytes]:
        try:
            yield _ndjson({"status": "pulling manifest"})
            while True:
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait({waiter, job}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield _ndjson(_progress_line(waiter.result()))
                    continue
                waiter.cancel()
                while not updates.empty():
                    yield _ndjson(_progress_line(updates.get_nowait()))
                break
            error = job.exception()
            if error is None:
                yield _ndjson({"status": "success"})
            elif isinstance(error, LocalLLMError):
                yield _ndjson({"error": from_localllm_error(error).message})
            else:
                yield _ndjson({"error": f"pull failed ({type(error).__name__}); the server log has the details"})
        finally:
            cancel.set()  # a client that went away stops the transfer; the partial file is kept

    async def stop() -> None:
        cancel.set()

    return EventStreamResponse(guarded(lines(), _error_line), NDJSON, stop)


def _progress_line(update: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"status": update.status}
    if update.file:
        line["status"] = f"{update.status} {update.file}"
        line["digest"] = update.file
    if update.total:
        line["total"] = update.total
        line["completed"] = update.completed
    return line
