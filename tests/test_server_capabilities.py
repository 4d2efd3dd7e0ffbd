"""What a model can do, as clients read it, and tools sent to a model whose template cannot take them.

One live server, three models: the plain starter (no template of its own, so
the built-in Gemma one: no tool support), a copy whose template renders tools
(`starter-tools`), and a copy whose GGUF says it is an embedding model
(`starter-embed`). Clients are the official openai, ollama and anthropic SDKs.
"""

from __future__ import annotations

import time

import anthropic
import httpx
import ollama
import openai
import pytest

from localllm.core.chat_template import builtin_template
from server_harness import TOOL_TEMPLATE, WEATHER_TOOL, copy_with_string_key, copy_with_uint32_key, make_store, start_server, served

POOLING_LAST = 3
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# Many tools, as Open WebUI sends with every chat (its built-ins number about 36).
MANY_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": f"Built-in helper number {i}: looks something up and returns it as text.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    }
    for i in range(36)
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("caps-home")
    files = tmp_path_factory.mktemp("caps-files")
    tools_copy = copy_with_string_key(starter_gguf, files / "starter-tools.gguf", "tokenizer.chat_template", TOOL_TEMPLATE)
    embed_copy = copy_with_uint32_key(starter_gguf, files / "starter-embed.gguf", "gemma3.pooling_type", POOLING_LAST)
    make_store(home, {"starter": starter_gguf, "starter-tools": tools_copy, "starter-embed": embed_copy})
    srv = start_server(home, "starter", "--ctx", "1024", "--max-loaded", "2", "--threads", "1")
    yield from served(srv)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def olm(server):
    return ollama.Client(host=server.url, timeout=120)


def wait_for_log(server, needle: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while needle not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    return server.log_text()


# -- /api/show -------------------------------------------------------------------------------


def test_show_lists_capabilities_from_the_template_in_use(olm):
    assert olm.show("starter").capabilities == ["completion"]
    assert olm.show("starter-tools").capabilities == ["completion", "tools"]
    assert olm.show("starter-embed").capabilities == ["embedding"]


def test_show_returns_the_template_in_use_and_a_modelfile(olm):
    plain = olm.show("starter")
    gemma = builtin_template("gemma3")[1]  # the starter has no template of its own
    assert plain.template == gemma
    assert plain.modelfile.splitlines()[1] == "FROM starter"
    assert f'TEMPLATE """{gemma}"""' in plain.modelfile
    stops = [line for line in plain.modelfile.splitlines() if line.startswith("PARAMETER stop ")]
    assert stops == ["PARAMETER stop <eos>", "PARAMETER stop <end_of_turn>"]
    assert plain.parameters.split() == ["stop", '"<eos>"', "stop", '"<end_of_turn>"']
    own = olm.show("starter-tools")
    assert own.template == TOOL_TEMPLATE and f'TEMPLATE """{TOOL_TEMPLATE}"""' in own.modelfile
    embedder = olm.show("starter-embed")
    assert embedder.template == "" and "TEMPLATE" not in embedder.modelfile


def test_v1_models_still_lists_every_model(oai):
    assert {m.id for m in oai.models.list().data} == {"starter", "starter-tools", "starter-embed"}


# -- tools for a model without tool support: Ollama ------------------------------------------


def test_ollama_chat_with_tools_for_a_model_without_tool_support_is_a_400(olm):
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as err:
            reply = olm.chat(model="starter", messages=QUESTION, tools=[WEATHER_TOOL], stream=stream, options={"num_predict": 4})
            list(reply) if stream else None
        assert err.value.status_code == 400 and err.value.error == "starter does not support tools"


def test_ollama_chat_with_tools_and_a_tool_history_on_a_tool_template(olm):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
    messages = [
        {"role": "user", "content": "Add 2 and 3"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}]},
        {"role": "tool", "content": "5", "tool_name": "add"},
    ]
    r = olm.chat(model="starter-tools", messages=messages, tools=tools, options={"temperature": 0, "num_predict": 6})
    assert r.done and isinstance(r.message.content, str)


# -- tools for a model without tool support: OpenAI-style APIs -------------------------------


def test_optional_tools_are_dropped_and_the_prompt_stays_as_without_them(server, oai):
    plain = oai.chat.completions.create(model="starter", messages=QUESTION, max_tokens=4, temperature=0)
    for choice in ({}, {"tool_choice": "auto"}):
        r = oai.chat.completions.create(model="starter", messages=QUESTION, tools=MANY_TOOLS, max_tokens=4, temperature=0, **choice)
        assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # not thousands of tokens of tool list
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == plain.choices[0].message.content
    log = wait_for_log(server, "its 36 tools were dropped")
    assert "request for 'starter': its 36 tools were dropped" in log


def test_a_required_call_still_works_through_the_grammar(oai):
    r = oai.chat.completions.create(model="starter", messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=40, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"


def test_a_tool_template_still_gets_the_tools(oai):
    plain = oai.chat.completions.create(model="starter-tools", messages=QUESTION, max_tokens=1, temperature=0)
    r = oai.chat.completions.create(model="starter-tools", messages=QUESTION, tools=[WEATHER_TOOL], max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the template wrote the tool out


def test_responses_and_messages_drop_optional_tools_too(server, oai):
    plain = oai.responses.create(model="starter", input="Hello", max_output_tokens=2, temperature=0)
    with_tools = oai.responses.create(model="starter", input="Hello", tools=[{"type": "function", **WEATHER_TOOL["function"]}], max_output_tokens=2, temperature=0)
    assert with_tools.usage.input_tokens == plain.usage.input_tokens
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
    alone = claude.messages.count_tokens(model="starter", messages=QUESTION)
    auto = claude.messages.count_tokens(model="starter", messages=QUESTION, tools=[tool])
    forced = claude.messages.count_tokens(model="starter", messages=QUESTION, tools=[tool], tool_choice={"type": "any"})
    assert auto.input_tokens == alone.input_tokens and forced.input_tokens > alone.input_tokens + 20


def test_raw_ollama_error_body(server):
    r = httpx.post(f"{server.url}/api/chat", json={"model": "starter", "messages": QUESTION, "tools": [WEATHER_TOOL]}, timeout=120)
    assert r.status_code == 400 and r.json() == {"error": "starter does not support tools"}
