"""The server's parts on their own: tool-call parsing, grammars, settings, keys, the model registry."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from localllm.backends.select import LoadOptions
from localllm.core.errors import BadRequest, ModelNotFound, NoChatTemplate, NotSupported, PromptTooLong, QueueFull
from localllm.server.errors import for_request
from localllm.server.auth import key_matches, presented_key, _digest
from localllm.server.json_grammar import literal, rename_root, schema_grammar
from localllm.server.registry import ModelRegistry
from localllm.server.run import ServerThread
from localllm.core.units import parse_size
from localllm.server.settings import ServerSettings, is_loopback, parse_duration
from localllm.store.store import ResolvedModel
from localllm.server.tools import HERMES, LLAMA3, MISTRAL, plan_tools, template_tool_format

from server_harness import make_store
from tui_fakes import FakeBackend
from waiting import until

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def plan(choice="auto", template=None, parallel=True):
    return plan_tools([TOOL], choice, parallel=parallel, template=template)


# -- tools ---------------------------------------------------------------------------------


def test_template_formats_are_recognised():
    assert template_tool_format(None) == (HERMES, False)
    assert template_tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") == (HERMES, False)
    assert template_tool_format("{% if tools %}<tool_call>{% endif %}") == (HERMES, True)
    assert template_tool_format("{% if tools %}[TOOL_CALLS]{% endif %}") == (MISTRAL, True)
    assert template_tool_format("{% if tools %}<|python_tag|>{% endif %}") == (LLAMA3, True)


def test_calls_are_parsed_in_each_format_and_other_text_stays_content():
    p = plan()
    content, calls = p.parse('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert content == "Sure." and [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})]
    _, calls = p.parse('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]')
    assert calls[0].arguments == {"city": "Rome"}
    _, calls = p.parse('{"name": "get_weather", "parameters": {"city": "Lima"}}')
    assert calls[0].arguments == {"city": "Lima"}
    assert p.parse('<tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call>')[1] == []
    assert p.parse("<tool_call>{not json</tool_call>")[1] == []
    assert p.parse("just words") == ("just words", [])
    call = p.parse('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Bern\\"}"}</tool_call>')[1][0]
    assert call.openai()["function"] == {"name": "get_weather", "arguments": '{"city": "Bern"}'}
    assert call.ollama() == {"function": {"name": "get_weather", "arguments": {"city": "Bern"}}}


def test_stream_parser_sends_text_at_once_and_holds_back_only_a_possible_call():
    stream = plan().stream()
    out = [stream.feed(piece) for piece in ["Hello", " there <", "tool_", "call>", '{"name": "get_weather", ', '"arguments": {}}', "</tool_call>"]]
    assert out[:2] == ["Hello", " there "] and "".join(out[2:]) == ""
    rest, calls = stream.finish()
    assert rest == "" and calls[0].name == "get_weather"
    stream = plan().stream()
    assert stream.feed("a <b") == "a <b" and stream.feed("<to") == "" and stream.feed("ast") == "<toast"
    assert stream.finish() == ("", [])


def test_forced_grammar_and_lazy_grammar():
    grammar, triggers = plan("required").grammar()
    assert grammar.startswith('root ::= "<tool_call>"') and "tool-call-json ::=" in grammar and triggers == []
    assert '"\\"get_weather\\""' in grammar  # the name is a constant
    grammar, triggers = plan("auto").grammar()
    assert triggers and "<tool_call>" in triggers[0] and "tool-call ::=" in grammar
    assert plan("none").grammar() == (None, [])


def test_non_native_templates_get_instructions_and_written_calls():
    p = plan("auto")
    messages = p.prepare_messages(
        [
            {"role": "system", "content": "Be kind."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    )
    assert messages[0]["content"].startswith("Be kind.") and '"name": "get_weather"' in messages[0]["content"]
    assert messages[1]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert "tool_calls" not in messages[1]
    assert messages[2]["content"] == "<tool_response>\nsunny\n</tool_response>"


def test_native_templates_get_arguments_as_objects():
    p = plan("auto", template="{% if tools %}<tool_call>{% endif %}")
    (message,) = p.prepare_messages(
        [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    )
    assert message["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert p.template_tools() == [{"type": "function", "function": {"name": "get_weather", **{"parameters": TOOL["function"]["parameters"]}}}]


@pytest.mark.parametrize(
    "tools, choice, needle",
    [
        ([{"type": "custom", "custom": {}}], "auto", "only tools of type 'function'"),
        ([{"type": "function", "function": {"name": "a b"}}], "auto", "letters"),
        ([TOOL, TOOL], "auto", "unique"),
        ([TOOL], {"type": "function", "function": {"name": "other"}}, "not among the tools"),
        ([TOOL], "sometimes", "tool_choice must be"),
        (None, "required", "tool_choice needs tools"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "minItems": 5000}}}], "required", "minItems"),
    ],
)
def test_bad_tool_requests_are_bad_requests(tools, choice, needle):
    with pytest.raises(BadRequest, match=needle):
        plan_tools(tools, choice, parallel=True, template=None)


# -- grammars ---------------------------------------------------------------------------------


def test_schema_limits_and_failures_are_bad_requests():
    for schema, needle in (
        ({"type": "string", "maxLength": 10**6}, "maxLength"),
        ({"type": "string", "pattern": "^a{99999}$"}, "repetitions"),
        ({"type": "nonsense"}, "cannot be turned into a grammar"),
        ({"enum": []}, "no JSON value"),
        ("not an object", "JSON Schema object"),
    ):
        with pytest.raises(BadRequest, match=needle):
            schema_grammar(schema, "format")
    deep: dict = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(BadRequest, match="deep"):
        schema_grammar(deep, "format")


def test_rename_root_leaves_literals_alone():
    grammar = schema_grammar({"type": "object", "properties": {"root": {"const": "root"}}, "required": ["root"]}, "f")
    renamed = rename_root(grammar, "inner")
    assert "root ::=" not in renamed and "inner ::=" in renamed and '\\"root\\"' in renamed
    assert literal('say "hi"\n') == '"say \\"hi\\"\\n"'


# -- settings and keys -----------------------------------------------------------------------------


def test_errors_with_facts_are_worded_in_each_api_s_own_fields():
    chat = for_request(PromptTooLong(1500, 1024), "/v1/chat/completions")
    assert (chat.status, chat.param, chat.code) == (400, "messages", "context_length_exceeded")
    assert "1500" in chat.message and "1024" in chat.message and "'messages'" in chat.message
    assert "'options.num_ctx'" in for_request(PromptTooLong(600, 512), "/api/generate").message
    assert for_request(PromptTooLong(600, 512), "/v1/completions").param == "prompt"
    assert "/v1/completions" in for_request(NoChatTemplate("enc", "bert"), "/v1/chat/completions").message
    assert "'raw'" in for_request(NoChatTemplate("enc", "bert"), "/api/chat").message
    for error in (PromptTooLong(9, 8), NoChatTemplate("enc", "bert"), NotSupported("native", "grammars", "llamacpp")):
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/chat", "/api/generate"):
            assert "--" not in for_request(error, path).message  # never a command-line flag


def test_durations_sizes_and_addresses():
    assert parse_duration("5m") == 300 and parse_duration("1h30m") == 5400 and parse_duration("250ms") == 0.25
    assert parse_duration(0) == 0 and parse_duration("-1") is None and parse_duration(-5) is None
    for bad in ("soon", "5x", "", True, None, float("nan")):
        with pytest.raises(BadRequest):
            parse_duration(bad)
    assert parse_size("8MiB", "x") == 8 * 1024 * 1024 and parse_size("512k", "x") == 512 * 1024 and parse_size("100", "x") == 100
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("myhost")
    with pytest.raises(BadRequest, match="refusing to serve ::"):
        ServerSettings(host="::").validate()
    ServerSettings(host="::", api_key="k").validate()
    ServerSettings(host="0.0.0.0", insecure_no_auth=True).validate()


def test_keys_from_headers_and_comparison():
    assert presented_key([(b"authorization", b"Bearer abc")]) == b"abc"
    assert presented_key([(b"x-api-key", b"abc")]) == b"abc"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert key_matches(b"abc", _digest("abc")) and not key_matches(b"abd", _digest("abc"))
    assert not key_matches(None, _digest("abc")) and not key_matches(b"", _digest("abc"))


# -- the registry, with real models ------------------------------------------------------------------


def test_registry_waits_for_a_busy_model_before_evicting_it(tmp_path, starter_gguf):
    store = make_store(tmp_path, {"starter": starter_gguf, "other": starter_gguf})
    registry = ModelRegistry(ServerSettings(max_loaded=1, max_queue=1, load=LoadOptions(n_ctx=256, n_threads=1)), store=store)

    async def scenario():
        first = await registry.acquire("starter")
        waiting = asyncio.ensure_future(registry.acquire("other"))
        await until(lambda: registry._pending == 2, what="the second request being admitted")
        assert not waiting.done()  # admitted, but starter is busy, so it cannot be evicted yet
        with pytest.raises(QueueFull):
            await registry.acquire("starter")  # one running + one queued is the limit
        first.release()
        second = await asyncio.wait_for(waiting, 60)
        assert [m.name for m in registry.loaded()] == ["other"]
        second.release()
        with pytest.raises(ModelNotFound):
            registry.resolve("/etc/passwd")
        with pytest.raises(ModelNotFound):
            registry.resolve(str(starter_gguf))
        await registry.close()
        assert registry.loaded() == []

    asyncio.run(scenario())


def test_a_held_model_is_shared_kept_and_let_go_once_idle(tmp_path, starter_gguf):
    """The UI's chat holds its model in the registry the API serves from: one backend for both, never evicted,
    reaped or closed by a server stop while held, unloaded once let go and no request runs on it."""
    store = make_store(tmp_path, {"other": starter_gguf, "third": starter_gguf})
    opened: list[FakeBackend] = []

    def opener(resolved, n_ctx):
        opened.append(FakeBackend(resolved.name))
        return opened[-1]

    registry = ModelRegistry(ServerSettings(max_loaded=1, keep_alive_s=0.0), store=store, opener=opener)

    async def scenario():
        held = await registry.hold(ResolvedModel("chat.gguf", starter_gguf), n_ctx=None)
        request = await registry.acquire("chat.gguf")  # a path, but the one the operator chose for the chat
        assert request.backend is held.backend and len(opened) == 1
        other = await registry.acquire("other")  # max_loaded counts what the server keeps besides the chat's
        other.release()
        third = await registry.acquire("third")  # evicts idle "other", never the held model
        third.release()
        await registry.reap_idle()
        assert [m.name for m in registry.loaded()] == ["chat.gguf"] and [b.closed for b in opened] == [False, True, True]
        await registry.close()  # what a server stop does: the held model stays
        assert [m.name for m in registry.loaded()] == ["chat.gguf"] and not opened[0].closed
        await registry.let_go(held)
        assert not opened[0].closed  # a request still runs on it
        request.release()
        await registry.reap_idle()
        assert opened[0].closed and registry.loaded() == []
        with pytest.raises(ModelNotFound):
            registry.resolve("chat.gguf")  # no longer the chat's: a path again

    asyncio.run(scenario())


def test_server_thread_starts_and_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path))
    server = ServerThread(ServerSettings(port=0))
    url = server.start()
    try:
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "loaded": []}
        r = httpx.post(f"{url}/api/chat", json={"model": "ghost", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and "ghost" in r.json()["error"]
        assert json.loads(httpx.get(f"{url}/openapi.json").text)["paths"]["/v1/chat/completions"]["post"]["responses"].keys() >= {"200", "400"}
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_lazy_tool_grammar_takes_over_once_the_model_opens_a_call(starter_gguf):
    """In `auto` mode the model writes freely until `<tool_call>`; from there the call must fit the schema."""
    from localllm.core.requests import GenerationRequest, SamplingParams, TokenEvent
    from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions
    from localllm.core.modelinfo import read_model_info

    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"enum": ["Lima", "Quito"]}}, "required": ["city"]},
        },
    }
    p = plan_tools([tool], "auto", parallel=False, template=None)
    grammar, triggers = p.grammar()
    shots = "".join(
        f'<tool_call>{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}</tool_call>\n' for c in ("Paris", "Rome", "Oslo")
    )
    backend = LlamaCppBackend("starter", read_model_info(starter_gguf), LlamaCppOptions(n_ctx=256, n_threads=1))

    async def run(params: SamplingParams) -> str:
        text = ""
        async for event in backend.generate(GenerationRequest("lazy", "Calls:\n" + shots, params)):
            text += event.text if isinstance(event, TokenEvent) else ""
        return text

    try:
        free = asyncio.run(run(SamplingParams(temperature=0, max_tokens=24)))
        forced = asyncio.run(run(SamplingParams(temperature=0, max_tokens=40, grammar=grammar, grammar_triggers=triggers)))
    finally:
        backend.close()
    assert free.startswith("<tool_call>") and "Lima" not in free and "Quito" not in free  # the model's own choice
    content, calls = p.parse(forced)
    assert content is None and len(calls) == 1 and calls[0].arguments["city"] in ("Lima", "Quito")
