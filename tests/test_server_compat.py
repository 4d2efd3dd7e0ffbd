"""What newer clients send, through the official `openai` and `ollama` clients against a live `localllm serve`.

Schemas as SDKs generate them ($defs/$ref, recursion, unanchored patterns),
fields that do not change the answer, Ollama's performance options, `n`
choices, tool calls cut by max_tokens, and the smaller details
(system_fingerprint, error params, an empty prompt). One server: the starter,
and a copy whose GGUF carries a tool-capable chat template (`starter-tools`).
"""

from __future__ import annotations

import json
import re
import time

import httpx
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from localllm.server.json_schema_prep import MAX_REF_DEPTH
from server_harness import TOOL_TEMPLATE, WEATHER_TOOL, copy_with_string_key, make_store, start_server, served


class Address(BaseModel):
    street: str = Field(max_length=30)
    city: str = Field(max_length=20)


class Person(BaseModel):
    """Models nested in models: the SDK writes them under $defs and points at them with $ref."""

    name: str = Field(max_length=20)
    home: Address
    work: Address | None = None


class Ticket(BaseModel):
    code: str = Field(pattern=r"[A-Z]{3}-\d{2}", max_length=20)  # unanchored: "contains"


class Tree(BaseModel):
    label: str = Field(max_length=8)
    children: list["Tree"] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("compat-home")
    files = tmp_path_factory.mktemp("compat-files")
    tools_copy = copy_with_string_key(starter_gguf, files / "starter-tools.gguf", "tokenizer.chat_template", TOOL_TEMPLATE)
    make_store(home, {"starter": starter_gguf, "starter-tools": tools_copy})
    srv = start_server(home, "starter", "--ctx", "2048", "--max-loaded", "2", "--parallel", "4", "--threads", "1")
    yield from served(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def ask(client, content: str, model: str = "starter", **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def depth(tree: Tree) -> int:
    return 1 + max((depth(c) for c in tree.children), default=0)


# -- schemas as SDKs send them ----------------------------------------------------------------


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_pydantic_function_tool_with_nested_models(client, choice):
    tool = openai.pydantic_function_tool(Person, name="save_person")
    assert "$defs" in json.dumps(tool)  # the SDK really sends references
    r = ask(client, "Save Ada, who lives at 1 Main St, Paris.", model="starter-tools", tools=[tool], tool_choice=choice, max_tokens=120)
    choice_ = r.choices[0]
    if choice == "required":
        assert choice_.finish_reason == "tool_calls"
    for call in choice_.message.tool_calls or []:
        assert call.function.name == "save_person"
        person = Person.model_validate_json(call.function.arguments)  # the grammar kept the nested schema
        assert isinstance(person.home, Address)


def test_parse_with_an_unanchored_pattern(client, server):
    r = client.chat.completions.parse(
        model="starter",
        messages=[{"role": "user", "content": "Give me a ticket code."}],
        response_format=Ticket,
        max_tokens=60,
        temperature=0,
    )
    ticket = r.choices[0].message.parsed
    assert isinstance(ticket, Ticket) and re.search(r"[A-Z]{3}-\d{2}", ticket.code)
    # Ollama's `format` takes the same schema
    reply = ollama.Client(host=server.url, timeout=120).chat(
        model="starter", messages=[{"role": "user", "content": "A ticket code?"}], format=Ticket.model_json_schema(), options={"temperature": 0, "num_predict": 60}
    )
    assert re.search(r"[A-Z]{3}-\d{2}", Ticket.model_validate_json(reply.message.content).code)


def test_recursive_model_within_the_depth_limit(client):
    r = client.chat.completions.parse(
        model="starter",
        messages=[{"role": "user", "content": "A family tree, as deep as you like."}],
        response_format=Tree,
        max_tokens=300,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    tree = r.choices[0].message.parsed
    assert isinstance(tree, Tree) and depth(tree) <= MAX_REF_DEPTH + 1
    tool = openai.pydantic_function_tool(Tree)
    r = ask(client, "Make a tree.", model="starter-tools", tools=[tool], tool_choice="required", max_tokens=300)
    (call,) = r.choices[0].message.tool_calls
    assert depth(Tree.model_validate_json(call.function.arguments)) <= MAX_REF_DEPTH + 1


def test_unsupported_schema_keyword_is_a_400_naming_it(client):
    schema = {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError, match="'not'"):
        ask(client, "Hi", max_tokens=5, response_format=fmt)
    bad_ref = {"type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": bad_ref}}
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "Hi", max_tokens=5, tools=[tool])
    assert "#/$defs/Missing" in err.value.body["message"] and "KeyError" not in err.value.body["message"]


# -- fields that do not change the answer ---------------------------------------------------------


def test_fields_that_do_not_change_the_answer_are_accepted(client):
    plain = ask(client, "Name a colour.", max_tokens=6)
    r = ask(
        client,
        "Name a colour.",
        max_tokens=6,
        user="u1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        safety_identifier="s1",
        prompt_cache_key="c1",
        prompt_cache_retention="24h",
        parallel_tool_calls=True,
        modalities=["text"],
        reasoning_effort="low",
        verbosity="medium",
        prediction={"type": "content", "content": "Red"},
        stream_options=None,
    )
    assert r.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"web_search_options": {}}, "web_search_options"),
        ({"moderation": {"policy": {"input": {"mode": "block"}}}}, "moderation"),
        ({"verbosity": "low"}, "verbosity"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"n": 9}, "n"),
    ],
)
def test_fields_that_would_change_the_answer_are_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "Hi", max_tokens=2, extra_body=extra)
    assert err.value.body["param"] == param and param in err.value.body["message"]


# -- Ollama options -----------------------------------------------------------------------------------


def test_ollama_performance_options_are_accepted_and_logged_once(server):
    client = ollama.Client(host=server.url, timeout=120)
    options = {
        "temperature": 0,
        "num_predict": 4,
        "num_thread": 3,
        "num_gpu": 0,
        "num_batch": 256,
        "num_keep": 4,
        "use_mmap": True,
        "use_mlock": False,
        "numa": False,
        "low_vram": False,
        "main_gpu": 0,
        "penalize_newline": True,
        "mirostat": 2,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.1,
        "typical_p": 0.9,
        "tfs_z": 1.0,
        "vocab_only": False,
        "f16_kv": True,
        "logits_all": False,
    }
    before = server.log_text().count("options ignored")
    r = client.generate(model="starter", prompt="The sky is", raw=True, options=options)
    assert r.done and r.eval_count == 4
    lines = [line for line in server.log_text().splitlines() if "options ignored" in line]
    assert len(lines) == before + 1
    assert "num_thread=3" in lines[-1] and "mirostat=2" in lines[-1] and "tfs_z" not in lines[-1]  # 1.0 changes nothing
    client.chat(model="starter", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2, "typical_p": 1.0})
    assert server.log_text().count("options ignored") == before + 1  # neutral values: nothing to say


# -- n choices --------------------------------------------------------------------------------------------


def test_n_choices_side_by_side(client):
    one = ask(client, "Tell me a story.", max_tokens=5)
    r = ask(client, "Tell me a story.", max_tokens=5, n=3, temperature=0.9, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") and isinstance(c.message.content, str) for c in r.choices)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert r.usage.completion_tokens <= 15 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint == one.system_fingerprint

    texts = {0: "", 1: ""}
    finishes = {}
    usage = None
    for chunk in ask(client, "Tell me a story.", max_tokens=6, n=2, temperature=0.9, seed=3, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert set(finishes) == {0, 1} and all(texts.values())
    assert usage.completion_tokens == 12 if set(finishes.values()) == {"length"} else usage.completion_tokens <= 12

    c = client.completions.create(model="starter", prompt="Once upon a time", max_tokens=4, n=2, temperature=0.9, seed=5)
    assert [x.index for x in c.choices] == [0, 1] and c.usage.completion_tokens == 8
    streamed = {}
    for chunk in client.completions.create(model="starter", prompt="Once upon a time", max_tokens=4, n=2, temperature=0.9, seed=5, stream=True):
        for x in chunk.choices:
            streamed[x.index] = streamed.get(x.index, "") + x.text
    assert set(streamed) == {0, 1} and all(streamed.values())
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="starter", prompt="x", max_tokens=2, n=9)
    assert err.value.body["param"] == "n"


def metric(server, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", httpx.get(f"{server.url}/metrics").text, flags=re.MULTILINE)
    return float(match.group(1))


def test_n_choices_run_side_by_side_and_a_disconnect_stops_them_all(server):
    story = {"type": "object", "properties": {"story": {"type": "string", "minLength": 1000}}, "required": ["story"]}
    body = {
        "model": "starter",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 900,
        "n": 3,
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": story}},  # no early end
    }
    chunks = {0: 0, 1: 0, 2: 0}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            assert "error" not in data and not any(c["finish_reason"] for c in data["choices"]), data
            for c in data["choices"]:
                chunks[c["index"]] += bool(c["delta"].get("content"))
            if min(chunks.values()) >= 3:
                break  # each choice is under way while none has ended: they run side by side
        generated = metric(server, "localllm_generated_tokens_total")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server, "localllm_requests_running") > 0:
        time.sleep(0.05)
    assert metric(server, "localllm_requests_running") == 0
    assert metric(server, "localllm_generated_tokens_total") - generated < 100  # the disconnect aborted all three


# -- a tool call cut by max_tokens ----------------------------------------------------------------------


def forced_call(client, max_tokens: int, **kw):
    return ask(
        client, "What is the weather in Paris?", model="starter-tools", tools=[WEATHER_TOOL], tool_choice="required", max_tokens=max_tokens, **kw
    )


def test_tool_call_cut_by_max_tokens(client):
    full = forced_call(client, 80, logprobs=True)
    assert full.choices[0].finish_reason == "tool_calls"
    tokens = [t.token for t in full.choices[0].logprobs.content]
    raw = "".join(tokens)
    closing = raw.index("</tool_call>")
    inside_close = next(i for i in range(len(tokens)) if len("".join(tokens[: i + 1])) > closing)  # the token opening the closing tag
    assert "".join(tokens[: inside_close + 1]).endswith(raw[closing : len("".join(tokens[: inside_close + 1]))])
    assert len("".join(tokens[: inside_close + 1])) < closing + len("</tool_call>"), "the closing tag is one token"
    args_start = raw.index('"arguments"')
    inside_args = next(i for i in range(len(tokens)) if len("".join(tokens[: i + 1])) > args_start + len('"arguments": {"'))

    # cut inside the closing tag: the complete call is kept
    r = forced_call(client, inside_close + 1)
    assert r.usage.completion_tokens == inside_close + 1
    (call,) = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == json.loads(full.choices[0].message.tool_calls[0].function.arguments)
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content

    # cut inside the arguments: a `length` finish with the arguments so far, never markup in content
    for stream in (False, True):
        if stream:
            chunks = list(forced_call(client, inside_args + 1, stream=True))
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            r = forced_call(client, inside_args + 1)
            calls, content, finish = r.choices[0].message.tool_calls, r.choices[0].message.content or "", [r.choices[0].finish_reason]
        assert finish == ["length"] and "<tool_call>" not in content
        (call,) = calls
        assert call.function.name == "get_weather" and call.function.arguments.startswith("{")
        assert call.function.arguments in raw
        with pytest.raises(ValueError):
            json.loads(call.function.arguments)


# -- smaller -----------------------------------------------------------------------------------------------


def test_system_fingerprint_is_a_stable_string(client):
    a = ask(client, "Hi", max_tokens=2)
    b = client.completions.create(model="starter", prompt="Hi", max_tokens=2)
    chunks = list(ask(client, "Hi", max_tokens=2, stream=True))
    assert isinstance(a.system_fingerprint, str) and a.system_fingerprint.startswith("fp_")
    assert a.system_fingerprint == b.system_fingerprint == chunks[0].system_fingerprint
    assert ask(client, "Hi", model="starter-tools", max_tokens=2).system_fingerprint != a.system_fingerprint


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": 123}]}, "messages[0].content"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ],
)
def test_error_params_name_fields_as_the_client_wrote_them(server, body, param):
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": "starter", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and f"'{param}'" in error["message"]
    assert not re.search(r"literal\[|\.str\b|\.0\.|'None'", error["message"] + param)


def test_null_body_says_what_is_wrong(server):
    r = httpx.post(f"{server.v1}/chat/completions", content=b"null", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "'None'" not in r.json()["error"]["message"]


def test_completion_accepts_an_empty_prompt(client):
    r = client.completions.create(model="starter", prompt="", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens >= 1


# -- the schema preparation on its own -------------------------------------------------------------------


def test_patterns_mean_contains_unless_anchored():
    from localllm.server.json_schema_prep import contains_pattern

    for pattern, inside, outside in (
        (r"[A-Z]{3}-\d{2}", "ref ABC-12 ok", "abc-12"),
        (r"^\d{3}$", "123", "1234"),
        ("cat|dog", "a dog!", "bird"),
        ("^a|b$", "ab", "ba"),
        (r"end$", "the end", "end."),
    ):
        anchored = contains_pattern(pattern)
        assert anchored.startswith("^") and anchored.endswith("$") and contains_pattern(anchored) == anchored
        assert re.fullmatch(anchored, inside) and not re.fullmatch(anchored, outside), (pattern, anchored)
    assert contains_pattern(r"^\d{3}$") == "^[0-9]{3}$"  # the converter has no \d
    within = contains_pattern("[A-Z]{3}", max_length=10)
    assert re.fullmatch(within, "xxxABCxxxx") and not re.fullmatch(within, "xxxxABCxxxx")  # 11 characters


def test_references_are_expanded_and_recursion_is_closed():
    from localllm.core.errors import BadRequest
    from localllm.server.json_schema_prep import prepare_schema

    tree = prepare_schema(Tree.model_json_schema(), "format")
    assert "$ref" not in json.dumps(tree) and "$defs" not in json.dumps(tree)
    levels, node = 0, tree
    while "properties" in node:
        levels, node = levels + 1, node["properties"]["children"]
        node = node.get("items", {})
    assert levels == MAX_REF_DEPTH  # Pydantic makes the root a $ref to Tree too: every level is an expansion
    optional = {"$defs": {"N": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]}}}}, "$ref": "#/$defs/N"}
    assert "$ref" not in json.dumps(prepare_schema(optional, "format"))
    endless = {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}
    for schema, needle in (
        (endless, "cannot end"),
        ({"$ref": "https://example.com/s.json"}, "not a local reference"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}}, "points at nothing"),
        ({"type": "object", "if": {}}, "'if'"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ):
        with pytest.raises(BadRequest, match=needle):
            prepare_schema(schema, "format")
