"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

For the anthropic SDK and Claude Code pointed at this server. A request runs
the same way a chat completion does (openai_routes.py): the model is leased,
the chat is templated and tokenized off the event loop, tools go through
tools.py (a grammar forces a call for tool_choice `any` or `tool`), and the
run is aborted when the client goes away. Only the shapes differ
(anthropic_messages.py), and errors on these paths take Anthropic's shape
(errors.py). Keys come as `x-api-key` (auth.py); `anthropic-version` and
`anthropic-beta` headers are accepted and not needed.

A reasoning model's thoughts come back as a `thinking` block (streamed as
`thinking_delta`s) before the text; `thinking: {type: "disabled"}` turns
thinking off where the template can (`enable_thinking`); a request that says
nothing follows the catalog's reasoning flag. Asking a model that does not
reason to think is accepted and logged as ignored. `output_config.format` (structured output) is a grammar, as
`response_format` is on OpenAI's route.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from localllm.core.reasoning import ReplyReasoning
from localllm.core.requests import GenerationRequest, TokenEvent
from localllm.server import anthropic_messages as shapes
from localllm.server.anthropic_schemas import CountTokensRequest, MessagesRequest
from localllm.server.capabilities import drop_optional_tools
from localllm.server.errors import APIError
from localllm.server.generation import ClientGone, EventStreamResponse, Run, collect, guarded, new_id, start_run
from localllm.server.json_bodies import OffLoopBodyRoute
from localllm.server.json_grammar import schema_grammar
from localllm.server.offloop import off_loop
from localllm.server.prompt_limits import check_message_count, check_prompt_chars, text_chars
from localllm.server.state import ServerState
from localllm.server.thinking import model_reasons, template_vars_for
from localllm.server.tools import ToolPlan

router = APIRouter(route_class=OffLoopBodyRoute)


def _state(request: Request) -> ServerState:
    return request.app.state.localllm


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request) -> Response:
    state = _state(request)
    lease = await state.registry.acquire(body.model)
    try:
        check_message_count(len(body.messages), lease.model.n_ctx)
        generation, plan, reasoning = await off_loop(_prepare, body, lease.backend, lease.model.n_ctx)
        run = await start_run(lease, generation, state.metrics)
    except BaseException:
        lease.release()
        raise
    mid = shapes.message_id(generation.request_id)
    if body.stream:
        prompt_tokens = len(generation.prompt) if isinstance(generation.prompt, list) else 0
        events = guarded(_stream(run, mid, body.model, plan, reasoning, prompt_tokens), _stream_error)
        return EventStreamResponse(events, "text/event-stream", run.close)
    try:
        tokens, finish = await collect(run, request)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the request was aborted
    if finish.reason == "error":
        raise APIError(500, finish.error or "the engine failed")
    split = reasoning.split("".join(t.text for t in tokens))
    text = split.answer
    content, calls = plan.parse(text) if plan else (text, [])
    reason, sequence = shapes.stop_reason(finish, bool(calls))
    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": body.model,
        "content": shapes.content_blocks(content, calls, split.reasoning),
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": shapes.usage(finish),
    }
    return JSONResponse(message)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, Any]:
    """The prompt's tokens as the model would see them: the real template over the real tokenizer."""
    state = _state(request)
    lease = await state.registry.acquire(body.model)
    try:
        check_message_count(len(body.messages), lease.model.n_ctx)
        return {"input_tokens": await off_loop(_count, body, lease.backend, lease.model.n_ctx)}
    finally:
        lease.release()


def _template_vars(body: CountTokensRequest, backend: Any) -> dict[str, bool]:
    """`thinking` as the template's `enable_thinking`; unsaid, the model's reasoning flag decides."""
    return template_vars_for(backend.info.chat_template, shapes.think_choice(body.thinking), body.model, model_reasons(backend), "thinking")


def _templated(body: CountTokensRequest, backend: Any, n_ctx: int | None) -> tuple[str, list[dict[str, Any]], ToolPlan | None, dict]:
    """(prompt, messages, tool plan, template variables): model work, run off the event loop."""
    messages = shapes.chat_messages(body)
    check_prompt_chars(text_chars(m.get("content") for m in messages), n_ctx, "messages")
    plan = drop_optional_tools(shapes.tool_plan(body.tools, body.tool_choice, backend.info.chat_template), body.model)
    if plan is not None:
        messages = plan.prepare_messages(messages)
    template_vars = _template_vars(body, backend)
    prompt = backend.render_chat(messages, tools=plan.template_tools() if plan else None, template_vars=template_vars)
    return prompt, messages, plan, template_vars


def _prepare(body: MessagesRequest, backend: Any, n_ctx: int | None) -> tuple[GenerationRequest, ToolPlan | None, ReplyReasoning]:
    params = shapes.sampling(body)  # cheap refusals before templating
    prompt, messages, plan, template_vars = _templated(body, backend, n_ctx)
    output_format = body.output_config.format if body.output_config else None
    if plan is not None and plan.choice != "none":
        if output_format is not None:
            raise APIError(400, "output_config.format cannot be combined with tools unless tool_choice is 'none'", param="output_config.format")
        params.grammar, params.grammar_triggers = plan.grammar()
    elif output_format is not None:
        params.grammar = schema_grammar(output_format.schema_, "output_config.format.schema")
    generation = GenerationRequest(new_id(), prompt, params, templated=True, messages=messages, template_vars=template_vars)
    return backend.prepare(generation), plan, ReplyReasoning.of(backend.info.chat_template, prompt, params)


def _count(body: CountTokensRequest, backend: Any, n_ctx: int | None) -> int:
    prompt, *_ = _templated(body, backend, n_ctx)
    tokens = backend.prompt_tokens(GenerationRequest("count", prompt, templated=True))
    if tokens is None:
        raise APIError(400, f"model '{body.model}' runs on a remote server: its tokens cannot be counted here", param="model")
    return len(tokens)


async def _stream(
    run: Run, mid: str, model: str, plan: ToolPlan | None, reasoning: ReplyReasoning, prompt_tokens: int
) -> AsyncIterator[bytes]:
    """Anthropic's event sequence: message_start, ping, content blocks, message_delta, message_stop."""
    start_usage = {"input_tokens": prompt_tokens, "output_tokens": 0}
    message = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    yield shapes.sse("message_start", {"message": message})
    yield shapes.sse("ping", {})
    blocks = _Blocks()
    tool_stream = plan.stream() if plan else None
    thoughts = reasoning.stream()

    def pieces(text: str, *, final: bool = False) -> list[bytes]:
        """Event lines for a piece of reply text: thoughts to the thinking block, the rest to text."""
        answer = text
        lines: list[bytes] = []
        if thoughts is not None:
            split = thoughts.flush() if final else thoughts.feed(text)
            lines += blocks.thinking(split.reasoning)
            answer = split.answer
        if answer:
            lines += blocks.text(tool_stream.feed(answer) if tool_stream else answer)
        return lines

    async for event in run.events():
        if isinstance(event, TokenEvent):
            for line in pieces(event.text):
                yield line
            continue
        if event.reason == "error":
            yield _stream_error(event.error or "the engine failed")
            return
        for line in pieces("", final=True):
            yield line
        calls = []
        if tool_stream:
            rest, calls = tool_stream.finish()
            for line in blocks.text(rest):
                yield line
        for line in blocks.tool_uses(calls):
            yield line
        for line in blocks.close():
            yield line
        reason, sequence = shapes.stop_reason(event, bool(calls))
        yield shapes.sse("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": shapes.usage(event)})
        yield shapes.sse("message_stop", {})
        return


class _Blocks:
    """Numbers content blocks and opens and closes them as a reply's pieces arrive."""

    def __init__(self) -> None:
        self.index = -1
        self.open_text = False
        self.open_thinking = False

    def thinking(self, text: str) -> list[bytes]:
        """Thoughts come first, so their block opens before any text block."""
        if not text:
            return []
        lines = []
        if not self.open_thinking:
            self.index += 1
            self.open_thinking = True
            lines.append(shapes.sse("content_block_start", {"index": self.index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}))
        lines.append(shapes.sse("content_block_delta", {"index": self.index, "delta": {"type": "thinking_delta", "thinking": text}}))
        return lines

    def text(self, text: str) -> list[bytes]:
        if not text:
            return []
        lines = self.close() if self.open_thinking else []
        if not self.open_text:
            self.index += 1
            self.open_text = True
            lines.append(shapes.sse("content_block_start", {"index": self.index, "content_block": {"type": "text", "text": ""}}))
        lines.append(shapes.sse("content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": text}}))
        return lines

    def tool_uses(self, calls: list) -> list[bytes]:
        lines = self.close()
        for call in calls:
            self.index += 1
            block = {**shapes.tool_use_block(call), "input": {}}
            partial = json.dumps(call.arguments, ensure_ascii=False)
            lines.append(shapes.sse("content_block_start", {"index": self.index, "content_block": block}))
            lines.append(shapes.sse("content_block_delta", {"index": self.index, "delta": {"type": "input_json_delta", "partial_json": partial}}))
            lines.append(shapes.sse("content_block_stop", {"index": self.index}))
        return lines

    def close(self) -> list[bytes]:
        """End the open block; a thinking block ends with its (empty) signature, as Anthropic's do."""
        if self.open_thinking:
            self.open_thinking = False
            return [
                shapes.sse("content_block_delta", {"index": self.index, "delta": {"type": "signature_delta", "signature": ""}}),
                shapes.sse("content_block_stop", {"index": self.index}),
            ]
        if not self.open_text:
            return []
        self.open_text = False
        return [shapes.sse("content_block_stop", {"index": self.index})]


def _stream_error(message: str) -> bytes:
    return shapes.sse("error", {"error": {"type": "api_error", "message": message}})
