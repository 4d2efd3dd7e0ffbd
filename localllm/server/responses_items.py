"""The Responses API's items, translated to the chat the rest of the server speaks and back.

Input items become the OpenAI-style chat messages that chat templates and
tools.py already take: `message` items (text parts) become messages
(`developer` as `system`), `function_call` items become an assistant's
`tool_calls`, `function_call_output` items become `tool` messages. Function
tools are flattened differently from chat's (`name` beside `type`) and are
nested back. Replies go the other way: text becomes a `message` item with an
`output_text` part, parsed calls become `function_call` items. What a text
model cannot read (images, files, audio) or this server cannot run (built-in
tools such as web_search) is a 400 that names the item.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from localllm.core.errors import BadRequest
from localllm.core.requests import FinishEvent, SamplingParams
from localllm.server.errors import APIError
from localllm.server.json_grammar import json_object_grammar, schema_grammar
from localllm.server.responses_schemas import ResponsesRequest
from localllm.server.tools import ToolCall, ToolPlan, plan_tools

_TEXT_PARTS = ("input_text", "output_text", "text")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# Items a client sends back from an earlier reply that no chat template takes: skipped.
_SKIPPED_ITEMS = ("reasoning",)


# -- request checks -----------------------------------------------------------------------


def check_refused(body: ResponsesRequest) -> None:
    """400 for fields that would change the answer in ways this server cannot honour."""
    if body.background:
        raise APIError(400, "'background': true is not supported by this server; send the request and wait, or stream it", param="background")
    for name in ("conversation", "prompt", "context_management"):
        if getattr(body, name) is not None:
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    if body.truncation not in (None, "disabled"):
        raise APIError(400, "'truncation' other than 'disabled' is not supported by this server", param="truncation")
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise APIError(400, "'text.verbosity' other than 'medium' is not supported by this server", param="text.verbosity")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")


# -- input ------------------------------------------------------------------------------------


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's `input` as chat messages (instructions apart: they are not replayed later)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(_function_output(item, where))
        elif kind in _SKIPPED_ITEMS:
            continue
        elif isinstance(kind, str):
            raise APIError(400, f"{where}: items of type '{kind}' are not supported by this server", param=f"{where}.type")
        else:
            raise APIError(400, f"{where}: an input item needs a 'type' or a 'role'", param=where)
    return out


def listed_input(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items with ids, the way GET /v1/responses/{id}/input_items lists them."""
    if isinstance(body.input, str):
        return [{"id": item_id("msg"), "type": "message", "role": "user", "status": "completed", "content": [{"type": "input_text", "text": body.input}]}]
    out = []
    for item in body.input:
        item = dict(item)
        kind = item.setdefault("type", "message")
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        if kind == "message":
            item.setdefault("status", "completed")
        item.setdefault("id", item_id({"message": "msg", "function_call": "fc"}.get(kind, "item")))
        out.append(item)
    return out


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    role = _ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise APIError(400, f"{where}.role must be 'user', 'assistant', 'system' or 'developer'", param=f"{where}.role")
    return {"role": role, "content": _text(item.get("content"), f"{where}.content")}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise APIError(400, f"{where}[{j}]: '{kind}' parts are not supported: this server's models read text only", param=f"{where}[{j}]")
        else:
            raise APIError(400, f"{where}[{j}]: only text parts (input_text, output_text) are supported (got {kind!r})", param=f"{where}[{j}]")
    return "".join(texts)


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    name, arguments, call_id = item.get("name"), item.get("arguments", "{}"), item.get("call_id")
    if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(arguments, str):
        raise APIError(400, f"{where}: a function_call item needs 'call_id', 'name' and 'arguments' (a JSON string)", param=where)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _function_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = item.get("call_id")
    if not isinstance(call_id, str):
        raise APIError(400, f"{where}.call_id is required", param=f"{where}.call_id")
    return {"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output", ""), f"{where}.output")}


def name_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results get the name of the function whose call they answer (in this input or earlier)."""
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", [])}
    return [{**m, "name": names[m["tool_call_id"]]} if m["role"] == "tool" and "name" not in m and m["tool_call_id"] in names else m for m in messages]


# -- tools and formats --------------------------------------------------------------------------


def tool_plan(body: ResponsesRequest, template: str | None) -> ToolPlan | None:
    """tools.py's plan for the request's function tools and tool_choice."""
    functions = []
    for i, tool in enumerate(body.tools or []):
        kind = tool.get("type")
        if kind != "function":
            what = f"the built-in tool '{kind}'" if isinstance(kind, str) else "a tool without a 'type'"
            raise APIError(400, f"tools[{i}]: {what} is not available here; only function tools are", param=f"tools[{i}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        functions.append({"type": "function", "function": function})
    choice = body.tool_choice
    if isinstance(choice, dict):
        choice, functions = _dict_choice(choice, functions)
    parallel = body.parallel_tool_calls is not False and body.max_tool_calls != 1
    try:
        return plan_tools(functions or None, choice, parallel=parallel, template=template)
    except BadRequest as exc:
        param = "tool_choice" if "tool_choice" in str(exc) else "tools"
        raise APIError(400, str(exc), param=param) from None


def _dict_choice(choice: dict[str, Any], functions: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """A named function, or `allowed_tools` (a subset of the tools, in `auto` or `required` mode)."""
    kind = choice.get("type")
    if kind == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}, functions
    if kind == "allowed_tools":
        tools = choice.get("tools")
        if not isinstance(tools, list) or not tools:
            raise APIError(400, "tool_choice.tools must list the allowed tools", param="tool_choice.tools")
        allowed = {t.get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)}
        if len(allowed) != len(tools):
            raise APIError(400, "tool_choice.tools: only function tools are available here", param="tool_choice.tools")
        mode = choice.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise APIError(400, "tool_choice.mode must be 'auto' or 'required'", param="tool_choice.mode")
        return mode, [f for f in functions if f["function"]["name"] in allowed]
    raise APIError(400, f"tool_choice of type {kind!r} is not supported by this server; only function tools are", param="tool_choice")


def constrain(params: SamplingParams, body: ResponsesRequest, plan: ToolPlan | None) -> None:
    """Grammars: a forced (or lazily opened) tool call, or the JSON that `text.format` asks for."""
    fmt = body.text.format if body.text else None
    kind = fmt.get("type") if fmt else "text"
    if kind not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"text.format.type must be 'text', 'json_object' or 'json_schema' (got {kind!r})", param="text.format.type")
    if plan is not None and plan.choice != "none":
        if kind != "text":
            raise APIError(400, "text.format JSON modes cannot be combined with tools unless tool_choice is 'none'", param="text.format")
        params.grammar, params.grammar_triggers = plan.grammar()
    elif kind == "json_object":
        params.grammar = json_object_grammar()
    elif kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):  # type: ignore[union-attr]
            raise APIError(400, "text.format of type json_schema needs a 'schema' object", param="text.format.schema")
        params.grammar = schema_grammar(fmt["schema"], "text.format.schema")  # type: ignore[index]


# -- output -------------------------------------------------------------------------------------


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def message_item(mid: str, text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": [text_part(text, logprobs)]}


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`logprobs`: one entry per answer token (logprobs.py), when the request's `include` asks for them."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def wants_logprobs(body: ResponsesRequest) -> bool:
    return "message.output_text.logprobs" in (body.include or [])


def reasoning_item(rid: str, text: str, status: str) -> dict[str, Any]:
    """A reasoning model's thoughts, whole (as `content`), with no summary: nothing here writes one."""
    return {"id": rid, "type": "reasoning", "status": status, "summary": [], "content": [reasoning_part(text)]}


def reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def call_item(call: ToolCall, fid: str) -> dict[str, Any]:
    arguments = call.openai()["function"]["arguments"]
    status = "completed" if call.complete else "incomplete"
    return {"id": fid, "type": "function_call", "status": status, "call_id": call.id, "name": call.name, "arguments": arguments}


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reply's output items as the chat messages that replay them in a later turn."""
    texts = [part["text"] for item in output if item["type"] == "message" for part in item["content"]]
    calls = [
        {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
        for item in output
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return [message]


def status_of(finish: FinishEvent) -> tuple[str, dict[str, str] | None]:
    """(status, incomplete_details) of a finished reply."""
    if finish.reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def usage(finish: FinishEvent, reasoning_tokens: int = 0) -> dict[str, Any]:
    u = finish.usage
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": min(u.cached_prompt_tokens, u.prompt_tokens)},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def response_object(body: ResponsesRequest, rid: str, created_at: int) -> dict[str, Any]:
    """The Response object before any output: the request's settings echoed as OpenAI does."""
    fmt = (body.text.format if body.text else None) or {"type": "text"}
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "model": body.model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "prompt_cache_key": body.prompt_cache_key,
        "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
        "safety_identifier": body.safety_identifier,
        "service_tier": "default",
        "store": body.store is not False,
        "temperature": body.temperature,
        "text": {"format": fmt, "verbosity": "medium"},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": body.tools or [],
        "top_logprobs": body.top_logprobs or 0,
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def sse(event: str, data: dict[str, Any], sequence_number: int) -> bytes:
    """One server-sent event as OpenAI writes them: the type in `event:` and in the data."""
    payload = {"type": event, **data, "sequence_number": sequence_number}
    return f"event: {event}\ndata: ".encode() + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"
