"""Anthropic's Messages shapes, translated to the chat the rest of the server speaks and back.

A request's `system`, content blocks and tools become the OpenAI-style chat
messages and tool list that chat templates and tools.py already take: an
assistant's `tool_use` blocks become its `tool_calls`, a user's `tool_result`
blocks become `tool` messages. Replies go the other way: text and parsed
calls become `text` and `tool_use` blocks. Blocks a text model cannot read
(images, documents, Anthropic's server tools) are a 400 naming the block.
"""

from __future__ import annotations

import json
from typing import Any

from localllm.core.requests import FinishEvent, SamplingParams
from localllm.core.errors import BadRequest
from localllm.server.anthropic_schemas import AnthropicMessage, AnthropicTool, AnthropicToolChoice, CountTokensRequest, MessagesRequest
from localllm.server.errors import APIError
from localllm.server.sampling import sampling_params
from localllm.server.tools import ToolCall, ToolPlan, plan_tools

MAX_STOP_SEQUENCES = 16  # the engines' limit (SamplingParams.validate)

# Reasoning a client sends back from an earlier reply: not rendered (no template here takes it).
_REPLAYED_REASONING = ("thinking", "redacted_thinking")


def chat_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The request's system prompt and messages as chat-template messages."""
    out: list[dict[str, Any]] = []
    system = _system_text(body.system)
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            out.append(_assistant_message(i, message))
        else:
            out.extend(_user_messages(i, message))
    return out


def _system_text(system: str | list[dict[str, Any]] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n\n".join(_block_text(block, f"system[{j}]") for j, block in enumerate(system))


def _block_text(block: dict[str, Any], where: str) -> str:
    kind = block.get("type")
    if kind != "text":
        _refuse_block(kind, where)
    text = block.get("text")
    if not isinstance(text, str):
        raise APIError(400, f"{where}.text must be a string", param=f"{where}.text")
    return text


def _refuse_block(kind: Any, where: str) -> None:
    if kind in ("image", "document"):
        why = f"'{kind}' blocks are not supported: this server's models read text only"
    else:
        why = f"'{kind}' blocks are not supported here" if isinstance(kind, str) else "a content block needs a 'type'"
    raise APIError(400, f"{where}: {why}", param=where)


def _assistant_message(i: int, message: AnthropicMessage) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):  # type: ignore[arg-type]
        where = f"messages[{i}].content[{j}]"
        kind = block.get("type")
        if kind == "tool_use":
            name, args = block.get("name"), block.get("input", {})
            if not isinstance(name, str) or not isinstance(args, dict):
                raise APIError(400, f"{where}: a tool_use block needs a 'name' and an 'input' object", param=where)
            call_id = block.get("id") if isinstance(block.get("id"), str) else None
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        elif kind in _REPLAYED_REASONING:
            continue
        else:
            texts.append(_block_text(block, where))
    result: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
    if calls:
        result["tool_calls"] = calls
    return result


def _user_messages(i: int, message: AnthropicMessage) -> list[dict[str, Any]]:
    """A user turn: its tool results as `tool` messages, its text as one user message, in order."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(message.content):  # type: ignore[arg-type]
        where = f"messages[{i}].content[{j}]"
        if block.get("type") != "tool_result":
            texts.append(_block_text(block, where))
            continue
        if texts:
            out.append({"role": "user", "content": "\n\n".join(texts)})
            texts = []
        tool_use_id = block.get("tool_use_id")
        if not isinstance(tool_use_id, str):
            raise APIError(400, f"{where}.tool_use_id is required", param=f"{where}.tool_use_id")
        out.append({"role": "tool", "tool_call_id": tool_use_id, "content": _tool_result_text(block, where)})
    if texts:
        out.append({"role": "user", "content": "\n\n".join(texts)})
    return out


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n\n".join(_block_text(part, f"{where}.content[{k}]") for k, part in enumerate(content))
    else:
        raise APIError(400, f"{where}.content must be a string or a list of text blocks", param=f"{where}.content")
    return f"Error: {text}" if block.get("is_error") else text


def tool_plan(tools: list[AnthropicTool] | None, choice: AnthropicToolChoice | None, template: str | None) -> ToolPlan | None:
    """tools.py's plan for Anthropic's tools and tool_choice (`any` is OpenAI's `required`)."""
    functions = []
    for i, tool in enumerate(tools or []):
        if tool.type not in (None, "custom"):
            raise APIError(400, f"tools[{i}]: the server tool '{tool.type}' is not available here; only custom tools (name, description, input_schema) are", param=f"tools[{i}].type")
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description:
            function["description"] = tool.description
        functions.append({"type": "function", "function": function})
    openai_choice: Any = None
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice of type 'tool' needs a 'name'", param="tool_choice.name")
            openai_choice = {"type": "function", "function": {"name": choice.name}}
        else:
            openai_choice = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if not functions and choice is not None and choice.type in ("any", "tool"):
        raise APIError(400, f"tool_choice '{choice.type}' needs tools", param="tool_choice")
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    try:
        return plan_tools(functions or None, openai_choice, parallel=parallel, template=template)
    except BadRequest as exc:
        raise APIError(400, str(exc), param="tools") from None


def sampling(body: MessagesRequest) -> SamplingParams:
    stops = body.stop_sequences or []
    if not all(stops) or len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"'stop_sequences' takes at most {MAX_STOP_SEQUENCES} strings, none of them empty", param="stop_sequences")
    return sampling_params(body.max_tokens, body.temperature, body.top_p, top_k=body.top_k, stop=body.stop_sequences)


# -- replies ------------------------------------------------------------------------------


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_use_id(call), "name": call.name, "input": call.arguments}


def tool_use_id(call: ToolCall) -> str:
    return "toolu_" + call.id.removeprefix("call_")


def content_blocks(text: str | None, calls: list[ToolCall], thinking: str = "") -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [thinking_block(thinking)] if thinking else []
    if text:
        blocks.append({"type": "text", "text": text})
    return blocks + [tool_use_block(c) for c in calls]


def thinking_block(thinking: str) -> dict[str, Any]:
    """A reasoning model's thoughts; unsigned (the signature is empty): nothing here can vouch for them."""
    return {"type": "thinking", "thinking": thinking, "signature": ""}


def think_choice(thinking: dict[str, Any] | None) -> bool | None:
    """The request's `thinking` as on (enabled, adaptive), off (disabled) or unsaid."""
    kind = (thinking or {}).get("type")
    if kind is None:
        return None
    return kind != "disabled"


def stop_reason(finish: FinishEvent, has_calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a finished reply."""
    if has_calls:
        return "tool_use", None
    if finish.reason == "length":
        return "max_tokens", None
    if finish.stop_sequence is not None:
        return "stop_sequence", finish.stop_sequence
    return "end_turn", None


def usage(finish: FinishEvent) -> dict[str, int]:
    """Anthropic counts prompt tokens read from a cache apart from the rest, as this does."""
    u = finish.usage
    cached = min(u.cached_prompt_tokens, u.prompt_tokens)
    return {
        "input_tokens": u.prompt_tokens - cached,
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def message_id(request_id: str) -> str:
    return f"msg_{request_id}"


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event as Anthropic writes them: the type named twice, in `event:` and in the data."""
    return f"event: {event}\ndata: ".encode() + json.dumps({"type": event, **data}, ensure_ascii=False).encode("utf-8") + b"\n\n"
