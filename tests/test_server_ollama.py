"""The Ollama-compatible API, through the official `ollama` client, against a live `localllm serve`.

The store holds the starter under three names (hard links), so loading,
keep-alive and least-recently-used eviction can be watched through /api/ps.
"""

from __future__ import annotations

import json
import time

import httpx
import ollama
import pytest

from server_harness import make_store, start_server, served

FRANCE = "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("ollama-home")
    make_store(home, {"starter": starter_gguf, "starter-b": starter_gguf, "starter-c": starter_gguf})
    srv = start_server(home, "starter", "--ctx", "1024", "--max-loaded", "2", "--threads", "1")
    yield from served(srv)


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=120)


def loaded(client) -> dict[str, int]:
    return {m.model: m.context_length for m in client.ps().models}


def greedy(n: int, **kw) -> dict:
    return {"temperature": 0, "num_predict": n, **kw}


# -- listing ----------------------------------------------------------------------------


def test_version_root_and_tags(server, client):
    assert httpx.get(f"{server.url}/api/version").json() == {"version": __import__("localllm").__version__}
    assert httpx.get(server.url).text == "localllm is running"
    models = {m.model: m for m in client.list().models}
    assert set(models) == {"starter", "starter-b", "starter-c"}
    details = models["starter"].details
    assert (details.format, details.family, details.quantization_level) == ("gguf", "gemma3", "Q4_K_M")
    assert models["starter"].size == 253113024 and models["starter"].digest.startswith("a5fd3b62")


def test_show_describes_the_model(client):
    shown = client.show("starter:latest")
    assert shown.details.family == "gemma3" and shown.details.parameter_size == "268M"
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["gemma3.context_length"] == 32768 and shown.modelinfo["gemma3.block_count"] == 18
    # no template of its own: the built-in Gemma one it is rendered with, which has no tool support
    assert shown.capabilities == ["completion"] and "<start_of_turn>" in shown.template
    with pytest.raises(ollama.ResponseError) as err:
        client.show("ghost")
    assert err.value.status_code == 404 and "ghost" in err.value.error


# -- generate --------------------------------------------------------------------------------


def test_generate_raw_matches_the_reference_and_reports_stats(client):
    r = client.generate(model="starter", prompt=FRANCE, raw=True, options=greedy(8))
    assert r.response.startswith(" the capital of the country of France")
    assert r.done and r.done_reason == "length" and r.eval_count == 8 and r.prompt_eval_count == 6
    assert r.total_duration > r.eval_duration > 0 and r.prompt_eval_duration > 0


def test_generate_stream_equals_the_whole_reply(client):
    whole = client.generate(model="starter", prompt="Write a haiku about rain.", system="You are a poet.", options=greedy(12))
    parts = list(client.generate(model="starter", prompt="Write a haiku about rain.", system="You are a poet.", options=greedy(12), stream=True))
    assert "".join(p.response for p in parts) == whole.response
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == whole.done_reason


def test_generate_options_stop_seed_num_predict(client):
    full = client.generate(model="starter", prompt=FRANCE, raw=True, options=greedy(12)).response
    cut = client.generate(model="starter", prompt=FRANCE, raw=True, options=greedy(12, stop=["France"]))
    assert cut.response == full[: full.index("France")] and cut.done_reason == "stop"
    a = client.generate(model="starter", prompt="Once", raw=True, options={"temperature": 0.9, "seed": 7, "num_predict": 16}).response
    b = client.generate(model="starter", prompt="Once", raw=True, options={"temperature": 0.9, "seed": 7, "num_predict": 16}).response
    assert a == b


def test_format_json_and_schema_parse(client):
    r = client.generate(model="starter", prompt="Give a JSON object with a key 'ok' set to true.", format="json", options=greedy(200))
    assert r.done_reason == "stop" and isinstance(json.loads(r.response), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    r = client.chat(model="starter", messages=[{"role": "user", "content": "Describe a person."}], format=schema, options=greedy(200))
    data = json.loads(r.message.content)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


# -- chat ----------------------------------------------------------------------------------


def test_chat_stream_equals_the_whole_reply(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat(model="starter", messages=messages, options=greedy(10))
    assert whole.message.role == "assistant" and whole.done and whole.eval_count <= 10
    parts = list(client.chat(model="starter", messages=messages, options=greedy(10), stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1])


# -- models in memory ------------------------------------------------------------------------------


def test_load_unload_and_keep_alive(client):
    r = client.generate(model="starter-c", prompt="", keep_alive=0)
    assert r.done_reason == "unload" and "starter-c" not in loaded(client)
    r = client.generate(model="starter-c", keep_alive="1s")
    assert r.done_reason == "load" and "starter-c" in loaded(client)
    deadline = time.monotonic() + 10
    while "starter-c" in loaded(client) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "starter-c" not in loaded(client)  # its one-second keep-alive ran out
    client.chat(model="starter", messages=[], keep_alive=-1)
    (starter,) = [m for m in client.ps().models if m.model == "starter"]
    assert starter.expires_at.year > 2300  # never


def test_least_recently_used_model_is_unloaded_first(client):
    client.generate(model="starter", prompt="a", raw=True, options=greedy(1))
    client.generate(model="starter-b", prompt="a", raw=True, options=greedy(1))
    client.generate(model="starter", prompt="a", raw=True, options=greedy(1))  # starter is now the most recent
    client.generate(model="starter-c", prompt="a", raw=True, options=greedy(1))
    assert set(loaded(client)) == {"starter", "starter-c"}


def test_num_ctx_loads_the_model_with_that_context(client):
    client.generate(model="starter-b", prompt="a", raw=True, options=greedy(1, num_ctx=512))
    assert loaded(client)["starter-b"] == 512
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="starter-b", prompt="word " * 600, raw=True, options=greedy(1, num_ctx=512))
    assert err.value.status_code == 400 and "512" in err.value.error
    assert "options.num_ctx" in err.value.error and "--" not in err.value.error  # the request's field, not a flag


# -- pull -------------------------------------------------------------------------------------------


def test_pull_streams_progress_then_success(client):
    statuses = [p.status for p in client.pull("starter", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success" and len(statuses) >= 3
    assert client.pull("starter").status == "success"


def test_pull_of_an_unknown_name_fails_in_ollama_shape(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        list(client.pull("no-such-model-anywhere", stream=True))
    assert "no-such-model-anywhere" in err.value.error
    r = httpx.post(f"{server.url}/api/pull", json={"model": "no-such-model-anywhere", "stream": False})
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


# -- errors -------------------------------------------------------------------------------------------


def test_errors_are_ollama_shaped(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="ghost", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="temperature"):
        client.generate(model="starter", prompt="x", options={"temperature": -1})
    with pytest.raises(ollama.ResponseError, match="num_predict"):
        client.generate(model="starter", prompt="x", options={"num_predict": 0})
    with pytest.raises(ollama.ResponseError, match="images"):
        client.generate(model="starter", prompt="x", images=[b"\x89PNG"])
    with pytest.raises(ollama.ResponseError, match="thinking"):
        client.chat(model="starter", messages=[{"role": "user", "content": "x"}], think=True)
    r = httpx.post(f"{server.url}/api/chat", content=b'{"model": "starter", "messages": [')
    assert r.status_code == 400 and isinstance(r.json()["error"], str) and "JSON" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/generate", content=b'{"prompt": "x"}')
    assert r.status_code == 400 and r.json() == {"error": "'model' is required"}


def test_curl_style_form_content_type_is_read_as_json(server):
    body = json.dumps({"model": "starter", "prompt": FRANCE, "raw": True, "stream": False, "options": greedy(3)})
    r = httpx.post(f"{server.url}/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["response"].startswith(" the")


def test_generate_reports_logprobs_in_ollamas_shape(server):
    body = {"model": "starter", "prompt": "The capital of France is", "stream": False, "raw": True,
            "options": greedy(3), "logprobs": True, "top_logprobs": 2}
    reply = httpx.post(f"{server.url}/api/generate", json=body, timeout=120).json()
    entries = reply["logprobs"]
    assert len(entries) == reply["eval_count"] == 3
    for entry in entries:
        assert set(entry) == {"token", "logprob", "top_logprobs"}  # no `bytes`: that is OpenAI's shape
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert set(entry["top_logprobs"][0]) == {"token", "logprob"}
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-4  # greedy: the best is the one taken
