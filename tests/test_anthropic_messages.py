"""Anthropic's Messages shapes to chat messages and back (anthropic_messages.py), without a server."""

from __future__ import annotations

import json

import pytest

from localllm.core.requests import FinishEvent, Timings, Usage
from localllm.server import anthropic_messages as shapes
from localllm.server.anthropic_schemas import MessagesRequest
from localllm.server.errors import APIError
from localllm.server.tools import ToolCall

TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def request(**kw) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **kw})


def test_blocks_become_chat_messages_in_order():
    body = request(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Be kind."}],
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "a replayed thought", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "down"}], "is_error": True},
                    {"type": "text", "text": "And now?"},
                ],
            },
        ],
    )
    assert shapes.chat_messages(body) == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: down"},
        {"role": "user", "content": "And now?"},
    ]


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ([{"type": "image", "source": {}}], "messages[0].content[0]"),
        ([{"type": "text", "text": "hi"}, {"type": "document", "source": {}}], "messages[0].content[1]"),
        ([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}], "messages[0].content[0].content[0]"),
    ],
)
def test_blocks_a_text_model_cannot_read_are_refused_by_place(content, where):
    with pytest.raises(APIError) as err:
        shapes.chat_messages(request(messages=[{"role": "user", "content": content}]))
    assert err.value.status == 400 and err.value.message.startswith(where + ":") and "text only" in err.value.message


def test_tool_choice_maps_onto_the_chat_plan():
    tools = request(messages=[{"role": "user", "content": "x"}], tools=[TOOL]).tools
    choice = request(messages=[{"role": "user", "content": "x"}], tool_choice={"type": "any", "disable_parallel_tool_use": True}).tool_choice
    plan = shapes.tool_plan(tools, choice, None)
    assert (plan.choice, plan.forced_name, plan.parallel) == ("required", None, False)
    named = request(messages=[{"role": "user", "content": "x"}], tool_choice={"type": "tool", "name": "get_weather"}).tool_choice
    assert shapes.tool_plan(tools, named, None).forced_name == "get_weather"
    assert shapes.tool_plan(tools, None, None).choice == "auto"
    assert shapes.tool_plan(None, None, None) is None
    server_tool = request(messages=[{"role": "user", "content": "x"}], tools=[{"type": "web_search_20250305", "name": "web_search"}]).tools
    with pytest.raises(APIError, match="web_search_20250305"):
        shapes.tool_plan(server_tool, None, None)
    with pytest.raises(APIError, match="'any' needs tools"):
        shapes.tool_plan(None, choice, None)


def finish(reason: str, stop_sequence: str | None = None) -> FinishEvent:
    return FinishEvent("r", reason, Usage(prompt_tokens=30, completion_tokens=5, cached_prompt_tokens=12), Timings(), stop_sequence=stop_sequence)  # type: ignore[arg-type]


def test_stop_reasons_and_usage():
    assert shapes.stop_reason(finish("stop"), False) == ("end_turn", None)
    assert shapes.stop_reason(finish("stop", "END"), False) == ("stop_sequence", "END")
    assert shapes.stop_reason(finish("length"), False) == ("max_tokens", None)
    assert shapes.stop_reason(finish("stop"), True) == ("tool_use", None)
    assert shapes.usage(finish("stop")) == {"input_tokens": 18, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 12}


def test_replies_and_events_in_anthropic_shape():
    call = ToolCall("get_weather", {"city": "Paris"}, id="call_abc")
    assert shapes.content_blocks("Sure.", [call]) == [
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    assert shapes.content_blocks(None, []) == []
    event = shapes.sse("content_block_stop", {"index": 2})
    name, data = event.decode().strip().split("\n")
    assert name == "event: content_block_stop" and json.loads(data.removeprefix("data: ")) == {"type": "content_block_stop", "index": 2}


def test_empty_stop_sequences_are_refused_by_name():
    with pytest.raises(APIError) as err:
        shapes.sampling(request(messages=[{"role": "user", "content": "x"}], stop_sequences=["ok", ""]))
    assert err.value.param == "stop_sequences"
    params = shapes.sampling(request(messages=[{"role": "user", "content": "x"}], stop_sequences=["END"], top_k=5, top_p=0))
    assert (params.stop, params.top_k, params.temperature, params.max_tokens) == (["END"], 5, 0.0, 8)
