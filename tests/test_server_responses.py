"""OpenAI's Responses API, through the official `openai` client against a live `localllm serve`.

One server: a copy of the starter (Gemma 3 270M base) whose GGUF carries a
tool-capable chat template. A base model's words are not answers, so the
tests check shapes, event order, usage and stored state, and what grammars
force (a JSON schema, a required tool call), never the quality of the text.
Outputs are capped at a few tokens to keep the module quick.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from localllm.server.responses_store import ResponseStore, StoredResponse
from server_harness import TOOL_TEMPLATE, copy_with_string_key, make_store, start_server, served

MODEL = "starter-tools"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
VERDICT_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
VERDICT_FORMAT = {"format": {"type": "json_schema", "name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}
# An object the grammar cannot close in a few tokens: a cut is certain, whatever the model prefers.
LONG_FORMAT = {"format": {"type": "json_schema", "name": "essay", "schema": {"type": "object", "properties": {"essay": {"type": "string", "minLength": 200}}, "required": ["essay"]}}}


class City(BaseModel):
    name: str = Field(max_length=8)
    sunny: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("responses-home")
    files = tmp_path_factory.mktemp("responses-files")
    tools_copy = copy_with_string_key(starter_gguf, files / "starter-tools.gguf", "tokenizer.chat_template", TOOL_TEMPLATE)
    make_store(home, {MODEL: tools_copy})
    srv = start_server(home, MODEL, "--ctx", "2048", "--threads", "2")
    yield from served(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def create(client, **kw):
    kw.setdefault("max_output_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.responses.create(model=MODEL, **kw)


def assert_usage_adds_up(response, cap: int) -> None:
    u = response.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= cap
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0


# -- responses.create -----------------------------------------------------------------------


def test_a_string_input_gets_a_response_object(client):
    r = create(client, input="Tell me about Paris.", metadata={"run": "test"}, user="u1")
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.error is None
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"] and r.output_text
    assert r.metadata == {"run": "test"} and r.user == "u1" and r.store is True and r.max_output_tokens == 6
    assert_usage_adds_up(r, 6)


def test_items_and_instructions_become_the_prompt(client):
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Name a city."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris.", "annotations": []}]},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "And another one?"},
    ]
    plain = create(client, input=items, max_output_tokens=1)  # the prompts are what this checks
    instructed = create(client, input=items, instructions="You are a geography teacher who answers in one word.", max_output_tokens=1)
    assert instructed.instructions.startswith("You are a geography teacher")
    assert instructed.usage.input_tokens > plain.usage.input_tokens + 8  # the instructions are in the prompt
    alone = create(client, input="And another one?", max_output_tokens=1)
    assert plain.usage.input_tokens > alone.usage.input_tokens + 8  # so are the earlier turns
    assert_usage_adds_up(instructed, 1)


def test_input_items_of_a_stored_response_are_listed(client):
    items = [
        {"role": "user", "content": "Name a city."},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Another?"}]},
    ]
    r = create(client, input=items, max_output_tokens=1)
    listed = client.responses.input_items.list(r.id, order="asc")
    assert [i.type for i in listed.data] == ["message"] * 3 and [i.role for i in listed.data] == ["user", "assistant", "user"]
    assert [i.content[0].text for i in listed.data] == ["Name a city.", "Paris.", "Another?"]
    assert all(i.id.startswith("msg_") for i in listed.data)
    newest = client.responses.input_items.list(r.id, limit=1)
    assert newest.has_more and [i.id for i in newest.data] == [listed.data[-1].id]
    rest = client.responses.input_items.list(r.id, limit=5, after=newest.data[0].id)
    assert [i.id for i in rest.data] == [i.id for i in reversed(listed.data[:-1])] and not rest.has_more


def test_max_output_tokens_cut_is_incomplete(client):
    r = create(client, input="Write an essay.", text=LONG_FORMAT, max_output_tokens=4)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 4 and r.output[0].status == "incomplete"


def test_json_schema_output_parses(client):
    r = client.responses.parse(model=MODEL, input="Is it sunny in Rome?", text_format=City, max_output_tokens=40, temperature=0)
    assert r.status == "completed" and isinstance(r.output_parsed, City)
    assert r.text.format.type == "json_schema"
    obj = create(client, input="A JSON object, please.", text={"format": {"type": "json_object"}}, max_output_tokens=8)
    assert obj.text.format.type == "json_object" and obj.output_text.startswith("{")  # the grammar's doing


# -- streaming ----------------------------------------------------------------------------------


def test_stream_sends_the_spec_events_in_order(client):
    kw = {"model": MODEL, "input": "Is it sunny?", "text": VERDICT_FORMAT, "max_output_tokens": 30, "temperature": 0}
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert kinds[:4] == head and kinds[-4:] == tail and set(kinds[4:-4]) == {"response.output_text.delta"}
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and events[-4].text == deltas
    assert list(json.loads(deltas)) == ["ok"]
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    assert final.status == "completed" and final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.usage == final.usage


def test_a_cut_stream_ends_with_response_incomplete(client):
    events = list(create(client, input="Write an essay.", text=LONG_FORMAT, max_output_tokens=4, stream=True))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens" and final.usage.output_tokens == 4


# -- tools and stored conversations -----------------------------------------------------------


def test_forced_tool_call_then_its_output_continues_the_stored_conversation(client):
    first = create(client, input="What is the weather in Paris?", tools=[WEATHER_TOOL], tool_choice="required", max_output_tokens=40)
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert isinstance(json.loads(call.arguments)["city"], str)

    output = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees Celsius"}
    second = create(client, previous_response_id=first.id, input=[output], tools=[WEATHER_TOOL], tool_choice="none", max_output_tokens=2)
    assert second.previous_response_id == first.id and second.output[0].type == "message"
    # the stored question and call are replayed before the tool's output
    replayed = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens > replayed
    third = create(client, previous_response_id=second.id, input="Thanks. And in Rome?", tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40)
    assert third.output[0].type == "function_call" and third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_streamed_tool_call_sends_argument_events(client):
    kw = {"model": MODEL, "input": "Weather in Oslo?", "tools": [WEATHER_TOOL], "tool_choice": "required", "max_output_tokens": 40, "temperature": 0}
    with client.responses.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds[2:-1] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather" and "city" in call.arguments


def test_store_false_is_neither_retrievable_nor_continued(client):
    r = create(client, input="Hello", store=False, max_output_tokens=1)
    assert r.store is False
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(r.id)
    assert err.value.body["type"] == "invalid_request_error" and r.id in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        create(client, input="Go on", previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id"


def test_delete_then_get_is_404(client, server):
    r = create(client, input="Hello", max_output_tokens=1)
    assert client.responses.retrieve(r.id).id == r.id
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(r.id)
    assert err.value.status_code == 404 and set(err.value.body) == {"message", "type", "param", "code"}
    again = httpx.delete(f"{server.v1}/responses/{r.id}")
    assert again.status_code == 404 and again.json()["error"]["type"] == "invalid_request_error"


# -- field policy ----------------------------------------------------------------------------------


def test_fields_that_cannot_change_the_answer_are_accepted(client):
    r = create(
        client,
        input="Hello",
        safety_identifier="s1",
        prompt_cache_key="k1",
        service_tier="auto",
        parallel_tool_calls=False,
        truncation="disabled",
        reasoning={"effort": "low"},
        include=["reasoning.encrypted_content"],
        max_output_tokens=1,
    )
    assert r.status in ("completed", "incomplete")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]}, "input[0].content[0]"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_fields_that_would_change_the_answer_are_a_400_naming_them(client, fields, param):
    fields.setdefault("input", "Hello")
    with pytest.raises(openai.BadRequestError) as err:
        create(client, **fields)
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_unknown_fields_and_missing_input(client):
    with pytest.raises(openai.BadRequestError) as err:
        create(client, input="Hello", extra_body={"temprature": 0.5})
    assert err.value.body["param"] == "temprature" and "unrecognized" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        create(client, input=[])
    assert err.value.body["param"] == "input"


# -- the store ------------------------------------------------------------------------------------


def test_the_store_keeps_the_newest_responses():
    store = ResponseStore(max_stored=3)
    for i in range(5):
        store.put(StoredResponse({"id": f"resp_{i}"}, ({"role": "user", "content": str(i)},)))
    assert len(store) == 3 and store.get("resp_1") is None and store.get("resp_4") is not None
    assert store.delete("resp_4") and not store.delete("resp_4") and store.get("resp_4") is None


# -- logprobs ------------------------------------------------------------------------------------

LOGPROBS = dict(model=MODEL, input="Name a colour.", max_output_tokens=5, temperature=0, top_logprobs=3, include=["message.output_text.logprobs"])


def test_output_text_logprobs_match_chat_completions(client):
    response = client.responses.create(**LOGPROBS)
    part = response.output[0].content[0]
    assert part.type == "output_text" and len(part.logprobs) == response.usage.output_tokens, response
    assert "".join(lp.token for lp in part.logprobs) == part.text
    for lp in part.logprobs:
        assert lp.logprob <= 0 and bytes(lp.bytes) == lp.token.encode() and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob >= lp.logprob  # the most likely alternative first

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    same_prompt = chat.choices[0].logprobs.content
    assert [lp.token for lp in part.logprobs] == [lp.token for lp in same_prompt]
    assert [lp.logprob for lp in part.logprobs] == pytest.approx([lp.logprob for lp in same_prompt], abs=1e-3)

    plain = client.responses.create(**{**LOGPROBS, "include": None, "top_logprobs": None})
    assert plain.output[0].content[0].logprobs == [] and plain.output[0].content[0].text == part.text


def test_streamed_output_text_logprobs_are_the_same(client):
    whole = client.responses.create(**LOGPROBS).output[0].content[0].logprobs
    events = list(client.responses.create(stream=True, **LOGPROBS))
    deltas = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response.output[0].content[0]
    assert [lp.model_dump() for lp in deltas] == [lp.model_dump() for lp in done.logprobs] == [lp.model_dump() for lp in final.logprobs]
    assert [lp.token for lp in deltas] == [lp.token for lp in whole] and len(deltas) == 5
