"""The OpenAI-compatible API, through the official `openai` client, against a live `localllm serve`.

One server for the module: the starter preloaded, a copy of it whose GGUF
carries a tool-capable chat template (`starter-tools`), and a copy llama.cpp
cannot load (`broken`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from server_harness import (
    TOOL_TEMPLATE,
    WEATHER_TOOL,
    copy_with_renamed_key,
    copy_with_string_key,
    make_store,
    served,
    start_server,
)

FRANCE = "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("openai-home")
    files = tmp_path_factory.mktemp("openai-files")
    tools_copy = copy_with_string_key(starter_gguf, files / "starter-tools.gguf", "tokenizer.chat_template", TOOL_TEMPLATE)
    broken = copy_with_renamed_key(starter_gguf, files / "broken.gguf", "gemma3.attention.layer_norm_rms_epsilon")
    make_store(home, {"starter": starter_gguf, "starter-tools": tools_copy, "broken": broken})
    srv = start_server(home, "starter", "--ctx", "1024", "--max-loaded", "2", "--threads", "1")
    yield from served(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def chat(client, content: str, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="starter", messages=[{"role": "user", "content": content}], **kw)


# -- models ------------------------------------------------------------------------------


def test_models_lists_installed_models_and_gets_one(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["broken", "starter", "starter-tools"]
    model = client.models.retrieve("starter")
    assert model.id == "starter" and model.object == "model" and model.owned_by == "localllm"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


# -- completions -------------------------------------------------------------------------


def test_text_completion_matches_llama_cpp_reference(client):
    r = client.completions.create(model="starter", prompt=FRANCE, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text.startswith(" the capital of the country of France")
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 8, 14)


def test_text_completion_from_token_ids_and_stream_agree(client):
    ids = [2, 818, 5279, 529, 7001, 563]  # FRANCE with BOS, as llama.cpp tokenizes it
    whole = client.completions.create(model="starter", prompt=ids, max_tokens=8, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="starter", prompt=FRANCE, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_text_completion_logprobs(client):
    r = client.completions.create(model="starter", prompt=FRANCE, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == 3 and all(v <= 0 for v in lp.token_logprobs)
    assert lp.tokens[0] == " the" and len(lp.top_logprobs[0]) == 2 and " the" in lp.top_logprobs[0]
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]


# -- chat ---------------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(client):
    r = chat(client, "Say hello.", max_tokens=6)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "starter"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_include_usage_equals_the_plain_reply(client):
    plain = chat(client, "Name three colours.", max_tokens=12)
    chunks = list(chat(client, "Name three colours.", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_sends_no_usage(client):
    chunks = list(chat(client, "Hi", max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_reply_and_is_not_sent(client):
    full = client.completions.create(model="starter", prompt=FRANCE, max_tokens=12, temperature=0).choices[0].text
    assert "France" in full
    r = client.completions.create(model="starter", prompt=FRANCE, max_tokens=12, temperature=0, stop=["France"])
    assert r.choices[0].text == full[: full.index("France")]
    assert r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="starter", prompt=FRANCE, max_tokens=12, temperature=0, stop="France", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_presence_and_frequency_penalties_reach_the_sampler(client):
    plain = client.completions.create(model="starter", prompt=FRANCE, max_tokens=24, temperature=0).choices[0].text
    assert plain.count("France") >= 2  # greedy repeats itself...
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = client.completions.create(model="starter", prompt=FRANCE, max_tokens=24, temperature=0, **penalty)
        assert penalised.choices[0].text != plain  # ...and a penalty changes what comes out
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model="starter", prompt=FRANCE, max_tokens=2, frequency_penalty=2.5)


def test_max_completion_tokens_and_seed(client):
    r = chat(client, "Tell me a story.", max_completion_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    a = chat(client, "Tell me a story.", max_tokens=16, temperature=0.9, seed=42).choices[0].message.content
    b = chat(client, "Tell me a story.", max_tokens=16, temperature=0.9, seed=42).choices[0].message.content
    others = {chat(client, "Tell me a story.", max_tokens=16, temperature=0.9, seed=s).choices[0].message.content for s in (1, 2)}
    assert a == b and len(others | {a}) > 1


def test_chat_logprobs(client):
    r = chat(client, "Hi", max_tokens=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs)) and bytes(t.bytes) == t.token.encode()


def test_system_and_assistant_turns_are_accepted(client):
    r = client.chat.completions.create(
        model="starter",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "How are you?"},
        ],
        max_tokens=4,
        temperature=0,
    )
    assert r.choices[0].message.content is not None


# -- structured output ------------------------------------------------------------------------


def test_json_object_output_parses(client):
    for prompt in ("Give a JSON object with a key 'ok' set to true.", "What is 2+2? Answer as JSON."):
        r = chat(client, prompt, max_tokens=200, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_output_parses_and_matches(client):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "population": {"type": "integer"},
            "capital": {"type": "boolean"},
        },
        "required": ["city", "population", "capital"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    r = chat(client, "Describe Paris.", max_tokens=200, response_format=fmt)
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "population", "capital"}
    assert isinstance(data["city"], str) and len(data["city"]) <= 30
    assert isinstance(data["population"], int) and isinstance(data["capital"], bool)
    streamed = chat(client, "Describe Paris.", max_tokens=200, response_format=fmt, stream=True)
    assert json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)) == data


def test_unusable_schema_is_a_400(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "minItems": 10**9}}}
    with pytest.raises(openai.BadRequestError, match="minItems"):
        chat(client, "Hi", max_tokens=5, response_format=bad)


# -- tools --------------------------------------------------------------------------------------


def test_tool_call_round_trip_with_a_tool_capable_template(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(
        model="starter-tools", messages=messages, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=80, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "clear"})},
    ]
    final = client.chat.completions.create(
        model="starter-tools", messages=messages, tools=[WEATHER_TOOL], max_tokens=12, temperature=0
    )
    # the history (assistant call + tool result) went through the template: a longer prompt, a plain answer
    assert final.usage.prompt_tokens > r.usage.prompt_tokens + 20
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_named_tool_choice_streams_a_call_with_the_built_in_template(client):
    stream = client.chat.completions.create(
        model="starter",
        messages=[{"role": "user", "content": "Weather in Oslo, please."}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_tool_choice_naming_an_unknown_function_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="nope"):
        chat(client, "Hi", tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=5)


# -- errors -------------------------------------------------------------------------------------------


def test_unknown_model_is_a_404_in_openai_shape(server):
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": "ghost", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "ghost" in error["message"] and error["param"] == "model"


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"model": "starter", "messages": [', "not valid JSON"),
        (b'{"model": "starter"}', "'messages' is required"),
        (b'{"model": "starter", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "starter", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
        (b'{"model": "starter", "messages": [{"role": "user", "content": "x"}], "bogus": 1}', "unrecognized request argument 'bogus'"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_invalid_bodies_are_400_not_422(server, body, needle):
    r = httpx.post(f"{server.v1}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 9}, "n"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unsupported_options_are_400_naming_the_option(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "Hi", max_tokens=2, **extra)
    assert err.value.body["param"] == param and param in err.value.body["message"]


def test_completion_options_we_cannot_honour(client):
    for extra, param in (({"echo": True}, "echo"), ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="starter", prompt="x", max_tokens=2, **extra)
        assert err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="starter", prompt=[2, 10**7], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="one prompt per request"):
        client.completions.create(model="starter", prompt=["a", "b"], max_tokens=2)


def test_prompt_longer_than_the_context_names_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="starter", prompt="hello " * 1500, max_tokens=2)
    numbers = re.findall(r"\d+", err.value.body["message"])
    assert "1024" in numbers and any(int(n) > 1024 for n in numbers)
    # worded with the request's own field, never a command-line flag
    assert "'prompt'" in err.value.body["message"] and "--" not in err.value.body["message"]
    assert (err.value.body["param"], err.value.body["code"]) == ("prompt", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "hello " * 1500, max_tokens=2)
    assert "'messages'" in err.value.body["message"] and "--" not in err.value.body["message"]
    assert err.value.body["param"] == "messages"


def test_engine_failure_is_a_500_with_a_message_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.InternalServerError) as err:
        chat_model = client.chat.completions.create
        chat_model(model="broken", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    message = err.value.body["message"]
    assert "broken" in message and "Traceback" not in message and "File \"" not in message
    assert chat(client, "Still there?", max_tokens=3).usage.completion_tokens == 3


def test_no_cors_headers_without_cors_origin(server):
    r = httpx.get(f"{server.v1}/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(f"{server.v1}/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


# -- streams, disconnects, concurrency ---------------------------------------------------------------------


# A JSON string of at least 1000 characters: the grammar rules out an early end, so only an abort stops it.
LONG_REPLY = {
    "model": "starter",
    "messages": [{"role": "user", "content": "Tell a long story."}],
    "max_tokens": 900,
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "story",
            "schema": {"type": "object", "properties": {"story": {"type": "string", "minLength": 1000}}, "required": ["story"]},
        },
    },
}


def test_client_disconnect_mid_stream_aborts_and_frees_the_slot(server, client):
    before = metric(server, "localllm_generated_tokens_total")
    body = {**LONG_REPLY, "stream": True}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen == 3:
                break  # the role chunk and two tokens seen; leaving the block closes the connection
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server, "localllm_requests_running") > 0:
        time.sleep(0.05)
    assert metric(server, "localllm_requests_running") == 0
    assert metric(server, "localllm_requests_waiting") == 0
    generated = metric(server, "localllm_generated_tokens_total") - before
    assert 2 <= generated < 100, f"generation went on after the disconnect: {generated} tokens"
    started = time.monotonic()
    assert client.completions.create(model="starter", prompt=FRANCE, max_tokens=4, temperature=0).usage.completion_tokens == 4
    assert time.monotonic() - started < 10


def test_client_disconnect_during_a_non_streaming_reply_aborts_it(server):
    before = metric(server, "localllm_generated_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/chat/completions", json=LONG_REPLY, timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server, "localllm_requests_running") > 0:
        time.sleep(0.05)
    assert metric(server, "localllm_requests_running") == 0
    assert metric(server, "localllm_generated_tokens_total") - before < 200


def test_sixteen_concurrent_streams_all_complete(server):
    async def one(client, i):
        text, finish = "", None
        stream = await client.chat.completions.create(
            model="starter",
            messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return finish, usage.completion_tokens

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(all_of_them())
    assert len(results) == 16
    for finish, tokens in results:
        assert finish in ("stop", "length") and 1 <= tokens <= 8


# -- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_exposes_the_named_series(server, client):
    chat(client, "Hi", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "localllm_time_to_first_token_seconds_bucket",
        "localllm_inter_token_latency_seconds_bucket",
        "localllm_generated_tokens_total",
        "localllm_prompt_tokens_total",
        'localllm_requests_total{status="200"}',
        "localllm_requests_running",
        "localllm_requests_waiting",
        "localllm_kv_cache_usage_ratio",
    ):
        assert name in text, name
    assert metric(server, "localllm_time_to_first_token_seconds_count") >= 1
    assert metric(server, "localllm_inter_token_latency_seconds_count") >= 2
    assert 0 < metric(server, "localllm_kv_cache_usage_ratio") <= 1
    assert metric(server, "localllm_requests_total", '{status="404"}') >= 1
    assert metric(server, "localllm_requests_total", '{status="400"}') >= 1
