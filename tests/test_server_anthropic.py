"""Anthropic's Messages API, through the official `anthropic` client and raw httpx, against a live `localllm serve`.

One server for the module, with a key (the SDK sends it as `x-api-key`) and
SmolLM2 135M Instruct preloaded: a chat model with a ChatML template, so its
replies are answers. Greedy sampling makes a reply repeatable within the run;
no test expects particular words. Current SDKs have no `temperature`
argument, so it travels in `extra_body`, as such clients send it.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from server_harness import make_store, start_server, served

KEY = "anthropic-test-key"
MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    home = tmp_path_factory.mktemp("anthropic-home")
    make_store(home, {MODEL: smollm2_gguf})
    srv = start_server(home, MODEL, "--api-key", KEY, "--ctx", "2048", "--threads", "2")
    yield from served(srv)


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def create(client, **kw):
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 24)
    return client.messages.create(model=MODEL, extra_body={"temperature": 0}, **kw)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event in a raw response."""
    events = []
    for chunk in response.text.split("\n\n"):
        if not chunk.strip():
            continue
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


# -- messages.create -----------------------------------------------------------------------


def test_create_answers_in_anthropic_shape(client):
    m = create(client, system=[{"type": "text", "text": "You are a geography teacher."}], metadata={"user_id": "u1"})
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert [b.type for b in m.content] == ["text"] and text_of(m).strip()
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 10 and 0 < m.usage.output_tokens <= 24


def test_max_tokens_ends_with_max_tokens(client):
    m = create(client, max_tokens=3)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3 and text_of(m)


def test_a_stop_sequence_ends_with_its_name(client):
    full = text_of(create(client))
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]  # a word inside the greedy answer: the same answer stops right before it
    m = create(client, stop_sequences=["never-said-xyz", stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert text_of(m) == full[: full.index(stop)]


def test_thinking_is_accepted_and_logged_as_ignored(client, server):
    m = create(client, max_tokens=4, thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in m.content] == ["text"]
    assert "'thinking': ignored" in server.log_text()


# -- streaming ------------------------------------------------------------------------------


def test_stream_assembles_the_same_text_as_create(client):
    whole = create(client)
    with client.messages.stream(model=MODEL, max_tokens=24, messages=QUESTION, extra_body={"temperature": 0}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(whole) == text_of(final)
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert final.id.startswith("msg_")


def test_raw_stream_sends_anthropic_events_in_order(server):
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0, "stream": True, "messages": QUESTION}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    r = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start, delta = events[0][1]["message"], events[-2][1]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None} and delta["usage"]["output_tokens"] == 5
    assert all(data["delta"]["type"] == "text_delta" and data["index"] == 0 for _, data in events[3:-3])


# -- tools ---------------------------------------------------------------------------------


def test_forced_tool_use_and_a_tool_result_turn(client):
    m = create(client, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=60)
    assert m.stop_reason == "tool_use"
    (call,) = [b for b in m.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    assert isinstance(call.input, dict) and isinstance(call.input["city"], str)

    follow_up = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 degrees Celsius"}]},
    ]
    answer = create(client, messages=follow_up, tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens") and text_of(answer).strip()
    assert [b.type for b in answer.content] == ["text"]
    # the tool result is in the prompt: the turn costs more than the question alone did
    counted = client.messages.count_tokens(model=MODEL, messages=follow_up, tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    assert counted.input_tokens == answer.usage.input_tokens + answer.usage.cache_read_input_tokens
    alone = client.messages.count_tokens(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    assert counted.input_tokens > alone.input_tokens + 10


def test_streamed_tool_use_with_tool_choice_any(client):
    kw = {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "tool_choice": {"type": "any"}, "max_tokens": 60, "extra_body": {"temperature": 0}}
    with client.messages.stream(model=MODEL, **kw) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and kinds[-1] == "message_stop"
    assert final.stop_reason == "tool_use"
    (call,) = [b for b in final.content if b.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input["city"], str)


# -- count_tokens ----------------------------------------------------------------------------


def test_count_tokens_matches_the_prompt_a_message_runs(client):
    system = "You are terse."
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=QUESTION)
    m = create(client, system=system, max_tokens=2)
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens
    # SmolLM2's template has no tool support: optional tools are dropped, a required call describes them
    with_tools = client.messages.count_tokens(model=MODEL, system=system, messages=QUESTION, tools=[WEATHER_TOOL])
    assert with_tools.input_tokens == counted.input_tokens
    forced = client.messages.count_tokens(model=MODEL, system=system, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice={"type": "any"})
    assert forced.input_tokens > counted.input_tokens + 20  # the tool's description is in the prompt


# -- errors -----------------------------------------------------------------------------------


def test_keys_as_x_api_key_or_bearer_and_a_wrong_key_is_an_authentication_error(server):
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model=MODEL, max_tokens=4, messages=QUESTION)
    assert err.value.status_code == 401
    assert err.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}}
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0)  # Authorization: Bearer
    assert bearer.messages.count_tokens(model=MODEL, messages=QUESTION).input_tokens > 0
    r = httpx.post(f"{server.url}/v1/messages/count_tokens", json={"model": MODEL, "messages": QUESTION})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and "x-api-key" in r.json()["error"]["message"]


def test_bad_requests_are_invalid_request_errors(client, server):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as err:
        create(client, messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[1]" in err.value.message and "'image'" in err.value.message
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=QUESTION)
    assert missing.value.body["error"]["type"] == "not_found_error"
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "messages": QUESTION}, headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": "'max_tokens' is required"}}


def test_a_web_page_is_refused_in_anthropic_shape(server):
    headers = {"x-api-key": KEY, "Origin": "http://evil.example"}
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": QUESTION}, headers=headers)
    assert r.status_code == 403
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "permission_error" and "evil.example" in body["error"]["message"]
