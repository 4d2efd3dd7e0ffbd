"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET .../input_items.

For the OpenAI Agents SDK and Codex-style tools pointed at this server. A
request runs the way a chat completion does (openai_routes.py): the model is
leased, input items become chat messages (responses_items.py) that are
templated and tokenized off the event loop, function tools go through
tools.py (a grammar forces a call for `required` or a named function),
`text.format` is a grammar as `response_format` is on chat, and the run is
aborted when the client goes away. Only the shapes differ.

Responses are stored unless `store: false` (responses_store.py: in memory,
the newest 1,000 per server process), so `previous_response_id` continues a
conversation server-side: the stored chain's input and output are replayed as
chat messages before the new input. As at OpenAI, the earlier `instructions`
are not carried over, and tools are sent again with each request.

A reasoning model's thoughts are a `reasoning` item (its text in `content`,
streamed as `response.reasoning_text.delta`) before the message item;
`reasoning.effort` "none" or "minimal" turns thinking off where the template
takes `enable_thinking`, any other effort on; no effort follows the catalog's
reasoning flag. `include: ["message.output_text.logprobs"]` puts the answer
tokens' logprobs (with `top_logprobs` alternatives) on the output_text part
and its deltas; usage counts the thought tokens as `reasoning_tokens`. Thoughts are not replayed in later turns.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from localllm.core.reasoning import ReasoningStream, ReplyReasoning, Split
from localllm.core.requests import FinishEvent, GenerationRequest, TokenEvent
from localllm.server import responses_items as items
from localllm.server.capabilities import drop_optional_tools
from localllm.server.errors import APIError
from localllm.server.generation import ClientGone, EventStreamResponse, Run, collect, guarded, new_id, start_run
from localllm.server.json_bodies import OffLoopBodyRoute
from localllm.server.logprobs import token_logprobs
from localllm.server.offloop import off_loop
from localllm.server.prompt_limits import check_message_count, check_prompt_chars, text_chars
from localllm.server.responses_schemas import ResponsesRequest
from localllm.server.responses_store import ResponseStore, StoredResponse
from localllm.server.sampling import sampling_params
from localllm.server.state import ServerState
from localllm.server.thinking import ThoughtCounter, effort_think, model_reasons, split_tokens, template_vars_for
from localllm.server.tools import ToolCall, ToolPlan

router = APIRouter(route_class=OffLoopBodyRoute)

_STOPPED = "the server is stopping; retry when it is back"  # the words of stopping.py's 503


def _state(request: Request) -> ServerState:
    return request.app.state.localllm


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    state = _state(request)
    items.check_refused(body)
    history = _history(state.responses, body.previous_response_id)
    if not body.input and not history:
        raise APIError(400, "'input' is required", param="input")
    lease = await state.registry.acquire(body.model)
    try:
        check_message_count(len(history) + (1 if isinstance(body.input, str) else len(body.input)), lease.model.n_ctx, "input")
        generation, plan, own, reasoning = await off_loop(_prepare, body, history, lease.backend, lease.model.n_ctx)
        run = await start_run(lease, generation, state.metrics)
    except BaseException:
        lease.release()
        raise
    reply = _Reply(body, state.responses, (*history, *own))
    if body.stream:
        return EventStreamResponse(guarded(_stream(run, reply, plan, reasoning.stream()), reply.error_event), "text/event-stream", run.close)
    try:
        tokens, finish = await collect(run, request)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the request was aborted
    if finish.reason == "error":
        raise APIError(500, finish.error or "the engine failed", code="engine_error")
    if finish.reason == "abort":
        raise APIError(503, _STOPPED, code="server_stopping")
    split = reasoning.split("".join(t.text for t in tokens))
    thought_tokens, answer_tokens = split_tokens(reasoning, tokens)
    logprobs = token_logprobs(answer_tokens) if items.wants_logprobs(body) else None
    text = split.answer
    content, calls = plan.parse(text, cut=finish.reason == "length") if plan else (text, [])
    status, _ = items.status_of(finish)
    thought_status = "completed" if text else status  # an answer followed: the thoughts ended
    output = [items.reasoning_item(items.item_id("rs"), split.reasoning, thought_status)] if split.reasoning else []
    output += [items.message_item(items.item_id("msg"), content, status, logprobs)] if content else []
    output += [items.call_item(call, items.item_id("fc")) for call in reply.allowed(calls)]
    return JSONResponse(reply.finished(output, finish, thought_tokens))


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    return _stored(_state(request).responses, response_id).response


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    after: str | None = None,
    limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    include: list[str] | None = Query(default=None),  # accepted: no item here has optional parts
) -> dict[str, Any]:
    """A stored response's own input items, a page at a time (OpenAI's cursor list)."""
    listed = list(_stored(_state(request).responses, response_id).input_items)
    if order == "desc":
        listed.reverse()
    if after is not None:
        ids = [item["id"] for item in listed]
        if after not in ids:
            raise APIError(400, f"'after': no input item '{after}' in response '{response_id}'", param="after")
        listed = listed[ids.index(after) + 1 :]
    page = listed[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(listed) > limit,
    }


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    store = _state(request).responses
    if not store.delete(response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _history(store: ResponseStore, previous_id: str | None) -> tuple[dict[str, Any], ...]:
    if previous_id is None:
        return ()
    entry = store.get(previous_id)
    if entry is None:
        raise APIError(404, f"Previous response with id '{previous_id}' not found.", param="previous_response_id", code="previous_response_not_found")
    return entry.history


def _stored(store: ResponseStore, response_id: str) -> StoredResponse:
    entry = store.get(response_id)
    if entry is None:
        raise _not_found(response_id)
    return entry


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


def _prepare(
    body: ResponsesRequest, history: tuple[dict[str, Any], ...], backend: Any, n_ctx: int | None
) -> tuple[GenerationRequest, ToolPlan | None, list[dict[str, Any]], ReplyReasoning]:
    """(generation, tool plan, this input as chat messages, how to read thoughts): model work, run off the event loop."""
    params = sampling_params(body.max_output_tokens, body.temperature, body.top_p)  # cheap refusals first
    own = items.input_messages(body)
    messages = items.name_tool_results([*history, *own])
    if body.instructions:
        messages = [{"role": "system", "content": body.instructions}, *messages]
    check_prompt_chars(text_chars(m.get("content") for m in messages), n_ctx, "input")
    plan = drop_optional_tools(items.tool_plan(body, backend.info.chat_template), body.model)
    if plan is not None:
        messages = plan.prepare_messages(messages)
    items.constrain(params, body, plan)
    if items.wants_logprobs(body):
        params.logprobs = body.top_logprobs or 0
    effort = (body.reasoning or {}).get("effort")
    think = effort_think(effort)
    template_vars = template_vars_for(backend.info.chat_template, think, body.model, model_reasons(backend), "reasoning.effort",
                                      effort=effort)
    prompt = backend.render_chat(messages, tools=plan.template_tools() if plan else None, template_vars=template_vars)
    generation = GenerationRequest(new_id(), prompt, params, templated=True, messages=messages,
                                   template_vars=template_vars, reasoning_effort=effort)
    return backend.prepare(generation), plan, own, ReplyReasoning.of(backend.info.chat_template, prompt, params)


class _Reply:
    """One response as it is built: its object, the numbering of its stream events, its storing."""

    def __init__(self, body: ResponsesRequest, store: ResponseStore, conversation: tuple[dict[str, Any], ...]) -> None:
        self.body = body
        self.store = store
        self.conversation = conversation
        self.object = items.response_object(body, items.item_id("resp"), int(time.time()))
        self.numbers = itertools.count()
        self.opened = 0  # output items opened so far: the next one's output_index

    def event(self, kind: str, /, **data: Any) -> bytes:
        return items.sse(kind, data, next(self.numbers))

    def error_event(self, message: str) -> bytes:
        return self.event("error", code="server_error", message=message, param=None)

    def allowed(self, calls: list[ToolCall]) -> list[ToolCall]:
        """The calls `max_tool_calls` lets through."""
        return calls[: self.body.max_tool_calls] if self.body.max_tool_calls else calls

    def finished(self, output: list[dict[str, Any]], finish: FinishEvent, thought_tokens: int = 0) -> dict[str, Any]:
        """The final object; stored (unless `store: false`) so it can be read and continued."""
        status, details = items.status_of(finish)
        self.object.update(status=status, incomplete_details=details, output=output, usage=items.usage(finish, thought_tokens))
        if self.body.store is not False:
            history = (*self.conversation, *items.output_messages(output))
            self.store.put(StoredResponse(self.object, history, tuple(items.listed_input(self.body))))
        return self.object

    def failed(self, message: str) -> dict[str, Any]:
        self.object.update(status="failed", error={"code": "server_error", "message": message})
        return self.object


async def _stream(run: Run, reply: _Reply, plan: ToolPlan | None, thoughts: ReasoningStream | None) -> AsyncIterator[bytes]:
    """The spec's event sequence, from response.created to response.completed (or .incomplete)."""
    yield reply.event("response.created", response=reply.object)
    yield reply.event("response.in_progress", response=reply.object)
    thinking = _TextItem(reply, "reasoning")
    message = _TextItem(reply, "message")
    tool_stream = plan.stream() if plan else None
    counter = ThoughtCounter()

    def pieces(event: TokenEvent | None) -> list[bytes]:
        """Events for a token's text (None: the end of the reply): thoughts to the reasoning item, the rest to the message."""
        lines: list[bytes] = []
        text = event.text if event is not None else ""
        split = Split(answer=text)
        if thoughts is not None:
            split = thoughts.flush() if event is None else thoughts.feed(text)
            lines += thinking.delta(split.reasoning)
            text = split.answer
        if event is not None:
            counter.count(event, thoughts, split)
            if counter.answered and event.logprobs:
                message.logprobs_to_come += token_logprobs([event])
        if text:
            answer = tool_stream.feed(text) if tool_stream else text
            if answer and thinking.item is not None and not thinking.closed:
                lines += thinking.close("completed")
            lines += message.delta(answer)
        return lines

    async for event in run.events():
        if isinstance(event, TokenEvent):
            for line in pieces(event):
                yield line
            continue
        if event.reason in ("error", "abort"):
            message_text = (event.error or "the engine failed") if event.reason == "error" else _STOPPED
            yield reply.event("response.failed", response=reply.failed(message_text))
            return
        status, _ = items.status_of(event)
        for line in pieces(None):
            yield line
        calls: list[ToolCall] = []
        if tool_stream:
            rest, calls = tool_stream.finish(cut=event.reason == "length")
            if rest and thinking.item is not None and not thinking.closed:
                for line in thinking.close("completed"):
                    yield line
            for line in message.delta(rest):
                yield line
        output = []
        if thinking.item is not None:
            if not thinking.closed:  # cut while thinking
                for line in thinking.close(status):
                    yield line
            output.append(thinking.item)
        if message.item is not None:
            for line in message.close(status):
                yield line
            output.append(message.item)
        for call in reply.allowed(calls):
            item = items.call_item(call, items.item_id("fc"))
            index = len(output)
            yield reply.event("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "arguments": ""})
            yield reply.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"])
            yield reply.event("response.function_call_arguments.done", item_id=item["id"], output_index=index, name=item["name"], arguments=item["arguments"])
            yield reply.event("response.output_item.done", output_index=index, item=item)
            output.append(item)
        final = reply.finished(output, event, counter.tokens)
        yield reply.event(f"response.{final['status']}", response=final)
        return


class _TextItem:
    """The reply's thoughts (a `reasoning` item) or its text (a `message` item), opened when its first text arrives."""

    def __init__(self, reply: _Reply, kind: Literal["reasoning", "message"]) -> None:
        self.reply = reply
        self.kind = kind
        self.item: dict[str, Any] | None = None
        self.index = 0
        self.text = ""
        self.closed = False
        self.logprobs: list[dict[str, Any]] = []  # the message's, when the request includes them
        self.logprobs_to_come: list[dict[str, Any]] = []  # tokens whose text is still held back

    def delta(self, text: str) -> list[bytes]:
        if not text:
            return []
        lines = []
        if self.item is None:
            self.index = self.reply.opened
            self.reply.opened += 1
            if self.kind == "message":
                self.item = {"id": items.item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            else:
                self.item = {"id": items.item_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
            lines.append(self.reply.event("response.output_item.added", output_index=self.index, item=self.item))
            lines.append(self.reply.event("response.content_part.added", **self._where(), part=self._part("")))
        self.text += text
        if self.kind == "message":
            fresh, self.logprobs_to_come = self.logprobs_to_come, []
            self.logprobs += fresh
            lines.append(self.reply.event("response.output_text.delta", **self._where(), delta=text, logprobs=fresh))
        else:
            lines.append(self.reply.event("response.reasoning_text.delta", **self._where(), delta=text))
        return lines

    def close(self, status: str) -> list[bytes]:
        assert self.item is not None
        self.closed = True
        if self.kind == "message":
            self.logprobs += self.logprobs_to_come
            self.logprobs_to_come = []
            self.item = items.message_item(self.item["id"], self.text, status, self.logprobs)
            done = self.reply.event("response.output_text.done", **self._where(), text=self.text, logprobs=self.logprobs)
        else:
            self.item = items.reasoning_item(self.item["id"], self.text, status)
            done = self.reply.event("response.reasoning_text.done", **self._where(), text=self.text)
        return [
            done,
            self.reply.event("response.content_part.done", **self._where(), part=self.item["content"][0]),
            self.reply.event("response.output_item.done", output_index=self.index, item=self.item),
        ]

    def _part(self, text: str) -> dict[str, Any]:
        return items.text_part(text) if self.kind == "message" else items.reasoning_part(text)

    def _where(self) -> dict[str, Any]:
        assert self.item is not None
        return {"item_id": self.item["id"], "output_index": self.index, "content_index": 0}
