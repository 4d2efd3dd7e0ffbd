"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions (embeddings: embedding_routes.py).

Shapes follow OpenAI's field for field, so the official SDK (and anything
built on it) works unchanged. Options we cannot honour are a 400 that names
them; options that do not change an answer (user, metadata, store, ...) are
accepted (the policy is in schemas.py). `n` choices are `n` engine requests
submitted together, so a batching engine decodes them side by side.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import aclosing
from dataclasses import replace
from datetime import datetime
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from localllm import __version__
from localllm.core.reasoning import ReasoningStream, ReplyReasoning
from localllm.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from localllm.server.capabilities import drop_optional_tools
from localllm.server.errors import APIError
from localllm.server.generation import (
    ClientGone,
    EventStreamResponse,
    Run,
    close_all,
    collect_all,
    guarded,
    merged_events,
    new_id,
    start_run,
)
from localllm.server.json_bodies import OffLoopBodyRoute
from localllm.server.json_grammar import json_object_grammar, schema_grammar
from localllm.server.logprobs import token_logprobs
from localllm.server.offloop import off_loop
from localllm.server.prompt_limits import check_message_count, check_prompt_chars, text_chars
from localllm.server.registry import Lease
from localllm.server.sampling import sampling_params
from localllm.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from localllm.server.state import ServerState
from localllm.server.thinking import ThoughtCounter, effort_think, model_reasons, reasoning_tokens, template_vars_for
from localllm.server.tools import ToolCall, ToolPlan, plan_tools

router = APIRouter(route_class=OffLoopBodyRoute)

# known to OpenAI and changing the answer in ways we cannot honour (see schemas.py for the policy)
_REFUSED_CHAT_FIELDS = ("audio", "web_search_options", "functions", "function_call", "moderation")


def _state(request: Request) -> ServerState:
    return request.app.state.localllm


# -- models --------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [_model_object(state, name) for name in state.registry.known_names()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    await state.registry.find(model_id)  # ModelNotFound -> 404
    return _model_object(state, model_id)


def _model_object(state: ServerState, name: str) -> dict[str, Any]:
    manifest = state.registry.store.get(name)
    created = int(state.started_at)
    if manifest is not None:
        try:
            created = int(datetime.fromisoformat(manifest.added).timestamp())
        except ValueError:
            pass
    return {"id": name, "object": "model", "created": created, "owned_by": "localllm"}


# -- chat completions ------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    _refuse_common(body)
    for name in _REFUSED_CHAT_FIELDS:
        if getattr(body, name) is not None:
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    if body.modalities not in (None, ["text"]):
        raise APIError(400, "'modalities': only [\"text\"] is supported by this server", param="modalities")
    if body.verbosity not in (None, "medium"):
        raise APIError(400, "'verbosity' other than 'medium' is not supported by this server", param="verbosity")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")

    leases = await _acquire(state, body.model, body.n or 1)
    runs: list[Run] = []
    try:
        n_ctx = leases[0].model.n_ctx
        check_message_count(len(body.messages), n_ctx)
        check_prompt_chars(text_chars(m.content for m in body.messages), n_ctx, "messages")
        generation, plan, reasoning = await off_loop(_prepare_chat, body, leases[0].backend)
        for lease, choice in zip(leases, _choices(generation, len(leases))):
            runs.append(await start_run(lease, choice, state.metrics))
    except BaseException:
        await close_all(runs)
        for lease in leases:
            lease.release()
        raise
    meta = _Meta(f"chatcmpl-{generation.request_id}", body.model, int(time.time()), _fingerprint(leases[0]))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        body_lines = guarded(_chat_stream(runs, meta, plan, reasoning, include_usage), _sse_error)
        return EventStreamResponse(body_lines, "text/event-stream", lambda: close_all(runs))
    return await _chat_reply(runs, request, meta, plan, reasoning, bool(body.logprobs))


async def _acquire(state: ServerState, model: str, n: int) -> list[Lease]:
    """One lease per choice: each is a request to the engine, counted as such by admission control."""
    leases: list[Lease] = []
    try:
        for _ in range(n):
            leases.append(await state.registry.acquire(model))
    except BaseException:
        for lease in leases:
            lease.release()
        raise
    return leases


def _choices(generation: GenerationRequest, n: int) -> list[GenerationRequest]:
    """`n` copies of a prepared request, each its own engine request; a seed gives each its own seed."""
    copies = [generation]
    for i in range(1, n):
        params = generation.params
        if params.seed is not None:
            params = replace(params, seed=(params.seed + i) % 2**32)
        copies.append(replace(generation, request_id=new_id(), params=params))
    return copies


def _prepare_chat(body: ChatCompletionRequest, backend: Any) -> tuple[GenerationRequest, ToolPlan | None, ReplyReasoning]:
    """Tools, template, grammar and tokens for a chat request: model work, run off the event loop."""
    plan = plan_tools(
        [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice,
        parallel=body.parallel_tool_calls is not False,
        template=backend.info.chat_template,
    )
    plan = drop_optional_tools(plan, body.model)
    messages = [_message_dict(i, m) for i, m in enumerate(body.messages)]
    if plan is not None:
        messages = plan.prepare_messages(messages)
    template_vars = _template_vars(body, backend)
    prompt = backend.render_chat(messages, tools=plan.template_tools() if plan else None, template_vars=template_vars)
    params = _sampling(body, body.max_completion_tokens or body.max_tokens)
    if body.logprobs:
        params.logprobs = body.top_logprobs or 0
    _constrain(params, body, plan)
    generation = GenerationRequest(new_id(), prompt, params, templated=True, messages=messages,
                                   template_vars=template_vars, reasoning_effort=body.reasoning_effort)
    return backend.prepare(generation), plan, ReplyReasoning.of(backend.info.chat_template, prompt, params)


_TEMPLATE_OWN_VARS = ("messages", "tools", "add_generation_prompt")


def _template_vars(body: ChatCompletionRequest, backend: Any) -> dict[str, Any]:
    """`chat_template_kwargs` for the template (the chat and tools stay ours); thinking from
    `chat_template_kwargs.enable_thinking`, else `reasoning_effort`, else the model's reasoning flag."""
    extra = dict(body.chat_template_kwargs or {})
    for name in _TEMPLATE_OWN_VARS:
        if name in extra:
            raise APIError(400, f"'chat_template_kwargs.{name}' is set by the server", param=f"chat_template_kwargs.{name}")
    if "enable_thinking" not in extra:
        think = effort_think(body.reasoning_effort)
        extra.update(template_vars_for(backend.info.chat_template, think, body.model, model_reasons(backend), "reasoning_effort",
                                       effort=body.reasoning_effort))
    return extra


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: text content only, `developer` as `system`."""
    data: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts are supported (got {kind!r})", param=f"messages[{index}].content")
            texts.append(part["text"])
        content = "".join(texts)
    data["content"] = content
    if message.name is not None:
        data["name"] = message.name
    if message.tool_calls:
        data["tool_calls"] = [c.model_dump(exclude_none=True) for c in message.tool_calls]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    return data


def _constrain(params: SamplingParams, body: ChatCompletionRequest, plan: ToolPlan | None) -> None:
    """Grammars: a forced tool call, or the JSON that response_format asks for."""
    fmt = body.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if plan is not None and plan.choice != "none":
        if wants_json:
            raise APIError(400, "response_format JSON modes cannot be combined with tools unless tool_choice is 'none'", param="response_format")
        params.grammar, params.grammar_triggers = plan.grammar()
        return
    if fmt is None or fmt.type == "text":
        return
    if fmt.type == "json_object":
        params.grammar = json_object_grammar()
        return
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format of type json_schema needs json_schema.schema", param="response_format.json_schema")
    params.grammar = schema_grammar(fmt.json_schema.schema_, "response_format.json_schema.schema")


async def _chat_reply(
    runs: list[Run], request: Request, meta: "_Meta", plan: ToolPlan | None, reasoning: ReplyReasoning, logprobs: bool
) -> Response:
    try:
        results = await collect_all(runs, request)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the request was aborted
    choices = []
    thought_tokens = 0
    for index, (tokens, finish) in enumerate(results):
        _raise_on_engine_error(finish)
        thought_tokens += reasoning_tokens(reasoning, tokens)
        split = reasoning.split("".join(t.text for t in tokens))
        text = split.answer
        content, calls = plan.parse(text, cut=finish.reason == "length") if plan else (text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
        if reasoning.reasons:
            message["reasoning_content"] = split.reasoning or None
        reason = _finish_reason(finish)
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
            reason = _tool_finish_reason(calls)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": {"content": token_logprobs(tokens), "refusal": None} if logprobs else None,
                "finish_reason": reason,
            }
        )
    usage = _usage([finish for _, finish in results], thought_tokens)
    return JSONResponse({**meta.head("chat.completion"), "choices": choices, "usage": usage})


def _tool_finish_reason(calls: list[ToolCall]) -> str:
    """`tool_calls`, or `length` when max_tokens cut a call (reported with its arguments so far)."""
    return "tool_calls" if all(c.complete for c in calls) else "length"


async def _chat_stream(
    runs: list[Run], meta: "_Meta", plan: ToolPlan | None, reasoning: ReplyReasoning, include_usage: bool
) -> AsyncIterator[bytes]:
    head = meta.head("chat.completion.chunk")
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice], **extra})

    tool_streams = [plan.stream() if plan else None for _ in runs]
    thought_streams = [reasoning.stream() for _ in runs]
    thought_counters = [ThoughtCounter() for _ in runs]

    def answer_and_thoughts(index: int, event: TokenEvent | None) -> tuple[str, dict[str, Any]]:
        """A token's text (None: the end of the reply) as (answer text for the tool parser, reasoning delta)."""
        thoughts: ReasoningStream | None = thought_streams[index]
        if thoughts is None:
            return (event.text if event else ""), {}
        split = thoughts.flush() if event is None else thoughts.feed(event.text)
        if event is not None:
            thought_counters[index].count(event, thoughts, split)
        return split.answer, ({"reasoning_content": split.reasoning} if split.reasoning else {})
    finishes: list[FinishEvent] = []
    for index in range(len(runs)):
        yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
    async with aclosing(merged_events(runs)) as events:
        async for index, event in events:
            tool_stream = tool_streams[index]
            if isinstance(event, TokenEvent):
                answer, thought = answer_and_thoughts(index, event)
                if thought:
                    yield chunk(index, thought)
                text = tool_stream.feed(answer) if tool_stream else answer
                lp = {"content": token_logprobs([event]), "refusal": None} if event.logprobs else None
                if text or lp:
                    yield chunk(index, {"content": text}, logprobs=lp)
                continue
            if event.reason == "error":
                yield _sse({"error": _stream_error(event)})
                return
            reason = _finish_reason(event)
            answer, thought = answer_and_thoughts(index, None)
            if thought:
                yield chunk(index, thought)
            if tool_stream:
                answer = tool_stream.feed(answer) if answer else ""
            if answer:
                yield chunk(index, {"content": answer})
            if tool_stream:
                rest, calls = tool_stream.finish(cut=event.reason == "length")
                if rest:
                    yield chunk(index, {"content": rest})
                if calls:
                    yield chunk(index, {"tool_calls": [c.openai(index=i) for i, c in enumerate(calls)]})
                    reason = _tool_finish_reason(calls)
            yield chunk(index, {}, finish_reason=reason)
            finishes.append(event)
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(finishes, sum(c.tokens for c in thought_counters))})
    yield b"data: [DONE]\n\n"


# -- text completions ------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    _refuse_common(body)
    if body.echo:
        raise APIError(400, "'echo' is not supported by this server", param="echo")
    if body.suffix:
        raise APIError(400, "'suffix' is not supported by this server", param="suffix")
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, "'best_of' above 'n' is not supported by this server", param="best_of")
    prompt = _single_prompt(body.prompt)

    leases = await _acquire(state, body.model, body.n or 1)
    runs: list[Run] = []
    try:
        backend = leases[0].backend
        if isinstance(prompt, list):
            vocab = backend.info.vocab_size  # 0: unknown (a remote model): the upstream checks
            bad = next((t for t in prompt if not 0 <= t < vocab), None) if vocab else None
            if bad is not None:
                raise APIError(400, f"prompt token {bad} is outside the vocabulary (0 to {vocab - 1})", param="prompt")
        else:
            check_prompt_chars(len(prompt), leases[0].model.n_ctx, "prompt")
        params = _sampling(body, 16 if body.max_tokens is None else body.max_tokens)  # null: OpenAI's default
        params.logprobs = body.logprobs
        generation = await off_loop(backend.prepare, GenerationRequest(new_id(), prompt, params))
        for lease, choice in zip(leases, _choices(generation, len(leases))):
            runs.append(await start_run(lease, choice, state.metrics))
    except BaseException:
        await close_all(runs)
        for lease in leases:
            lease.release()
        raise
    meta = _Meta(f"cmpl-{generation.request_id}", body.model, int(time.time()), _fingerprint(leases[0]))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        body_lines = guarded(_completion_stream(runs, meta, include_usage), _sse_error)
        return EventStreamResponse(body_lines, "text/event-stream", lambda: close_all(runs))
    try:
        results = await collect_all(runs, request)
    except ClientGone:
        return Response(status_code=499)
    choices = []
    for index, (tokens, finish) in enumerate(results):
        _raise_on_engine_error(finish)
        choices.append(
            {
                "index": index,
                "text": "".join(t.text for t in tokens),
                "logprobs": _completion_logprobs(tokens) if body.logprobs is not None else None,
                "finish_reason": _finish_reason(finish),
            }
        )
    usage = _usage([finish for _, finish in results])
    return JSONResponse({**meta.head("text_completion"), "choices": choices, "usage": usage})


def _single_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt  # "" is a prompt too: the model starts from its BOS token
    if not prompt:
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if len(prompt) == 1:
        return _single_prompt(prompt[0])
    raise APIError(400, "one prompt per request: a list of several prompts is not supported", param="prompt")


async def _completion_stream(runs: list[Run], meta: "_Meta", include_usage: bool) -> AsyncIterator[bytes]:
    head = meta.head("text_completion")
    extra = {"usage": None} if include_usage else {}
    finishes: list[FinishEvent] = []
    async with aclosing(merged_events(runs)) as events:
        async for index, event in events:
            if isinstance(event, TokenEvent):
                if event.text or event.logprobs:
                    lp = _completion_logprobs([event]) if event.logprobs else None
                    choice = {"index": index, "text": event.text, "logprobs": lp, "finish_reason": None}
                    yield _sse({**head, "choices": [choice], **extra})
                continue
            if event.reason == "error":
                yield _sse({"error": _stream_error(event)})
                return
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": _finish_reason(event)}
            yield _sse({**head, "choices": [choice], **extra})
            finishes.append(event)
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(finishes)})
    yield b"data: [DONE]\n\n"


# -- shared ----------------------------------------------------------------------------------


class _Meta:
    def __init__(self, rid: str, model: str, created: int, fingerprint: str) -> None:
        self.rid, self.model, self.created, self.fingerprint = rid, model, created, fingerprint

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint}


def _fingerprint(lease: Lease) -> str:
    """Stable for one model file, engine and context size on one build, as OpenAI's is per backend configuration."""
    backend = lease.backend
    manifest = lease.model.resolved.manifest
    model = manifest.sha256 if manifest is not None and manifest.sha256 else str(backend.info.path)
    facts = f"{__version__}|{backend.name}|{model}|{lease.model.n_ctx}"
    return "fp_" + hashlib.sha256(facts.encode()).hexdigest()[:10]


def _refuse_common(body: Any) -> None:
    if body.logit_bias:
        raise APIError(400, "'logit_bias' is not supported by this server", param="logit_bias")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")


def _sampling(body: Any, max_tokens: int | None) -> SamplingParams:
    knobs = {name: getattr(body, name) for name in ("top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")}
    seed = None if body.seed is None else body.seed % 2**32  # OpenAI takes any integer; the engine's seed is 32-bit
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return sampling_params(max_tokens, body.temperature, body.top_p, seed=seed, stop=stop, **knobs)


def _finish_reason(finish: FinishEvent) -> str:
    return "length" if finish.reason == "length" else "stop"


def _raise_on_engine_error(finish: FinishEvent) -> None:
    if finish.reason == "error":
        raise APIError(500, finish.error or "the engine failed", code="engine_error")


def _stream_error(finish: FinishEvent) -> dict[str, Any]:
    return {"message": finish.error or "the engine failed", "type": "server_error", "param": None, "code": "engine_error"}


def _usage(finishes: list[FinishEvent], thought_tokens: int = 0) -> dict[str, Any]:
    """Usage of all choices: the prompt counted once (as OpenAI does), the completions (and their thoughts) summed."""
    first = finishes[0].usage
    completion = sum(f.usage.completion_tokens for f in finishes)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_prompt_tokens},
        "completion_tokens_details": {"reasoning_tokens": thought_tokens},
    }


def _completion_logprobs(tokens: list[TokenEvent]) -> dict[str, Any]:
    result: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for event in tokens:
        for lp in event.logprobs or []:
            result["tokens"].append(lp["text"])
            result["token_logprobs"].append(lp["logprob"])
            result["top_logprobs"].append({t["text"]: t["logprob"] for t in lp["top"]})
            result["text_offset"].append(offset)
            offset += len(lp["text"])
    return result


def _sse_error(message: str) -> bytes:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"
