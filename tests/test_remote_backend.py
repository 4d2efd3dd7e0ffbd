"""The remote backend, two real hops: our server in front of another real `localllm serve`.

The upstream is `localllm serve starter` with an API key of its own. The hop
is a second `localllm serve` whose remotes.toml routes `big` to the upstream
(key from an environment variable), `dead` to a closed port, `silent` to a
socket that never answers (1 s timeout), `ghost` to a name the upstream does
not have and `big-nokey` to the upstream without its key; it also serves its
own local starter. Clients talk to the hop with the hop's key.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from server_harness import make_store, start_server, served

from localllm.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from localllm.backends.select import LoadOptions, open_backend
from localllm.core.errors import BadRequest, UpstreamUnavailable
from localllm.backends.remotes import RemoteModel, load_routes

UPSTREAM_KEY = "upstream-secret"
HOP_KEY = "hop-secret"
KEY_ENV = "LOCALLLM_TEST_UPSTREAM_KEY"
FRANCE = "The capital of France is"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding counts on for thousands of tokens, no end of text
HELLO = [{"role": "user", "content": "Say hello."}]


def metric(server, name: str, key: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until_idle(server, key: str, timeout_s: float = 10.0) -> float:
    """Seconds until the server runs no request (or the timeout, when it still runs one)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s and metric(server, "localllm_requests_running", key) > 0:
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("upstream-home")
    make_store(home, {"starter": starter_gguf})
    srv = start_server(home, "starter", "--ctx", "1024", "--threads", "1", "--api-key", UPSTREAM_KEY)
    yield from served(srv)


@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts connections (the kernel completes them) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(scope="module")
def hop(tmp_path_factory, starter_gguf, upstream, silent_port):
    home = tmp_path_factory.mktemp("hop-home")
    make_store(home, {"starter": starter_gguf})
    (home / "remotes.toml").write_text(
        f"""
[big]
url = "{upstream.v1}"
model = "starter"
api_key_env = "{KEY_ENV}"

[big-nokey]
url = "{upstream.v1}"
model = "starter"

[ghost]
url = "{upstream.v1}"
model = "no-such-model"
api_key_env = "{KEY_ENV}"

[dead]
url = "http://127.0.0.1:{closed_port()}/v1"

[silent]
url = "http://127.0.0.1:{silent_port}/v1"
timeout_s = 1
"""
    )
    os.environ[KEY_ENV] = UPSTREAM_KEY  # the hop's process inherits it
    try:
        srv = start_server(home, "--ctx", "1024", "--threads", "1", "--api-key", HOP_KEY, "--max-loaded", "4")
    finally:
        del os.environ[KEY_ENV]
    yield from served(srv)


@pytest.fixture(scope="module")
def direct(upstream):
    return openai.OpenAI(base_url=upstream.v1, api_key=UPSTREAM_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(hop):
    return openai.OpenAI(base_url=hop.v1, api_key=HOP_KEY, max_retries=0, timeout=120)


# -- two hops ------------------------------------------------------------------------------------


def test_chat_and_completion_through_two_hops_equal_the_upstreams_own(direct, client):
    want = direct.chat.completions.create(model="starter", messages=HELLO, max_tokens=8, temperature=0)
    got = client.chat.completions.create(model="big", messages=HELLO, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.model == "big" and got.choices[0].finish_reason == want.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, 8)

    text = client.completions.create(model="big", prompt=FRANCE, max_tokens=8, temperature=0, logprobs=2)
    assert text.choices[0].text.startswith(" the capital of the country of France")  # llama.cpp's own answer
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (6, 8)
    assert "".join(text.choices[0].logprobs.tokens) == text.choices[0].text
    assert len(text.choices[0].logprobs.top_logprobs[0]) == 2


def test_streaming_passes_through_token_by_token(hop, client):
    whole = client.chat.completions.create(model="big", messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="big", messages=HELLO, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) >= 6  # token by token, not one block at the end (a held-back stop prefix may merge two)
    assert chunks[-1].usage.completion_tokens == 8
    ollama = httpx.post(
        f"{hop.url}/api/chat",
        json={"model": "big", "messages": HELLO, "options": {"num_predict": 8, "temperature": 0}},
        headers={"Authorization": f"Bearer {HOP_KEY}"},
        timeout=60,
    )
    lines = [line for line in ollama.text.splitlines() if line]
    assert len(lines) >= 7 and '"done":true' in lines[-1].replace(" ", "")


def test_local_and_remote_models_side_by_side(client):
    ids = {m.id for m in client.models.list()}
    assert {"starter", "big", "dead", "silent"} <= ids
    local = client.completions.create(model="starter", prompt=FRANCE, max_tokens=4, temperature=0)
    remote = client.completions.create(model="big", prompt=FRANCE, max_tokens=4, temperature=0)
    assert local.choices[0].text == remote.choices[0].text  # the same weights, one here and one upstream


def test_abort_at_hop_one_aborts_the_upstream_request(hop, upstream):
    before = metric(upstream, "localllm_generated_tokens_total", UPSTREAM_KEY)
    body = {"model": "big", "prompt": COUNTING, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{hop.v1}/completions", json=body, headers={"Authorization": f"Bearer {HOP_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator would close the response at once
        seen = 0
        while seen < 4:
            seen += next(lines).startswith("data: ")
        assert metric(upstream, "localllm_requests_running", UPSTREAM_KEY) == 1  # mid-generation up there
    # leaving the block closed our connection; the hop must close its upstream stream in turn
    assert wait_until_idle(upstream, UPSTREAM_KEY) < 5
    assert wait_until_idle(hop, HOP_KEY) < 5
    generated = metric(upstream, "localllm_generated_tokens_total", UPSTREAM_KEY) - before
    assert 4 <= generated < 150, f"the upstream went on after the abort: {generated} tokens"


# -- failures ----------------------------------------------------------------------------------


def test_dead_upstream_is_a_502_in_each_clients_shape(hop, client):
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="dead", messages=HELLO, max_tokens=4)
    assert err.value.status_code == 502
    assert err.value.body["type"] == "server_error" and err.value.body["code"] == "upstream_unavailable"
    assert "connection refused" in err.value.body["message"]
    streamed = httpx.post(
        f"{hop.v1}/completions",
        json={"model": "dead", "prompt": FRANCE, "stream": True},
        headers={"Authorization": f"Bearer {HOP_KEY}"},
    )
    assert streamed.status_code == 502 and "connection refused" in streamed.json()["error"]["message"]
    ollama = httpx.post(
        f"{hop.url}/api/generate", json={"model": "dead", "prompt": "hi"}, headers={"Authorization": f"Bearer {HOP_KEY}"}
    )
    assert ollama.status_code == 502 and "connection refused" in ollama.json()["error"]


def test_silent_upstream_times_out_as_a_502(client):
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="silent", prompt=FRANCE, max_tokens=4)
    assert err.value.status_code == 502 and "sent nothing for 1 s" in err.value.body["message"]
    assert time.monotonic() - started < 10


def test_upstream_client_errors_pass_through_with_their_message(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="ghost", messages=HELLO, max_tokens=4)
    assert "no-such-model" in err.value.body["message"] and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:  # longer than the upstream's 1024-token context
        client.completions.create(model="big", prompt="word " * 1500, max_tokens=4)
    assert "1024" in err.value.body["message"]


def test_an_upstream_that_refuses_our_key_is_a_502_not_the_clients_401(client):
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="big-nokey", messages=HELLO, max_tokens=4)
    assert err.value.status_code == 502 and "refused our API key" in err.value.body["message"]


def test_grammars_are_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="big", messages=HELLO, max_tokens=4, response_format={"type": "json_object"})
    assert "not available through the remote backend" in err.value.body["message"]


# -- serve --backend remote, and the CLI ------------------------------------------------------------


def test_serve_with_backend_remote_forwards_every_name(tmp_path, upstream):
    srv = start_server(tmp_path, "--backend", "remote", "--url", upstream.v1, "--remote-api-key", UPSTREAM_KEY)
    try:
        with openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=120) as c:
            reply = c.completions.create(model="starter", prompt=FRANCE, max_tokens=4, temperature=0)
            assert reply.choices[0].text == " the capital of the"
            with pytest.raises(openai.NotFoundError):
                c.completions.create(model="org/not-there", prompt=FRANCE, max_tokens=4)
    finally:
        srv.stop()
    assert "Traceback" not in srv.log_text(), srv.log_text()


def localllm(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALLLM_HOME": str(home), "LOCALLLM_REMOTE_API_KEY": UPSTREAM_KEY}
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_run_and_chat_with_backend_remote(tmp_path, upstream, direct):
    """No model is installed here: the name is the upstream's, the key comes from the environment."""
    want = direct.chat.completions.create(model="starter", messages=HELLO, max_tokens=8, temperature=0)
    run = localllm(tmp_path, "run", "--backend", "remote", "--url", upstream.v1, "starter", "Say hello.",
                   "--max-tokens", "8", "--temperature", "0")
    assert run.returncode == 0, run.stderr
    assert run.stdout == want.choices[0].message.content + "\n"
    raw = localllm(tmp_path, "run", "--url", upstream.v1, "starter", FRANCE, "--raw", "--max-tokens", "8", "--temperature", "0")
    assert raw.returncode == 0 and raw.stdout.startswith(" the capital of the country of France")
    chat = localllm(tmp_path, "chat", "--url", upstream.v1, "starter", "--max-tokens", "8", "--temperature", "0",
                    stdin="Say hello.\n/bye\n")
    assert chat.returncode == 0 and want.choices[0].message.content in chat.stdout
    assert not (tmp_path / "manifests").exists()  # nothing was pulled


def test_cli_errors_are_one_line(tmp_path, upstream):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    dead = localllm(tmp_path, "run", "--backend", "remote", "--url", url, "m", "hi")
    assert dead.returncode == 1 and dead.stderr == f"error: cannot reach the upstream at {url}: connection refused\n"
    for args, needle in [
        (("--backend", "remote"), "needs --url"),
        (("--backend", "llamacpp", "--url", upstream.v1), "--url is for --backend remote"),
        (("--url", "ftp://host/v1"), "must look like http://host:8000/v1"),
    ]:
        result = localllm(tmp_path, "run", *args, "m", "hi")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and needle in lines[0], result.stderr


# -- the backend itself -------------------------------------------------------------------------------


def test_backend_abort_ends_the_stream_and_the_upstream_request(upstream):
    options = LoadOptions(backend="remote", remote_url=upstream.v1, remote_api_key=UPSTREAM_KEY)
    backend = open_backend(RemoteModel.named("starter"), options)
    try:
        assert backend.info.format == "remote" and backend.info.model_name == "starter"
        assert backend.upstream_kind == "localllm"
        with pytest.raises(BadRequest, match="no /tokenize endpoint"):
            backend.tokenize("hello")

        async def run() -> tuple[int, FinishEvent]:
            request = GenerationRequest("abort-me", COUNTING, SamplingParams(temperature=0, max_tokens=2000))
            tokens = 0
            async for event in backend.generate(request):
                if isinstance(event, TokenEvent) and event.text:
                    tokens += 1
                    if tokens == 3:
                        assert backend.stats().running == 1
                        backend.abort("abort-me")
                elif isinstance(event, FinishEvent):
                    return tokens, event
            raise AssertionError("no finish event")

        tokens, finish = asyncio.run(run())
        assert finish.reason == "abort" and 3 <= finish.usage.completion_tokens < 50
        assert backend.stats().running == 0
        assert wait_until_idle(upstream, UPSTREAM_KEY) < 5
    finally:
        backend.close()


def test_dead_upstream_fails_when_the_backend_opens():
    options = LoadOptions(backend="remote", remote_url=f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(UpstreamUnavailable, match="connection refused"):
        open_backend(RemoteModel.named("m"), options)


def test_routes_file_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "remotes.toml"
    assert load_routes(path) == {}  # no file: no routes
    for text, needle in [
        ('[a]\nmodel = "x"\n', "url is required"),
        ('[a]\nurl = "host:8000"\n', "must look like http://host:8000/v1"),
        ('[a]\nurl = "http://h/v1"\nkey = "secret"\n', "unknown key 'key'"),
        ('[a]\nurl = "http://h/v1"\ntimeout_s = 0\n', "timeout_s must be a positive number"),
        ("a = 1\n", "each model is a table"),
        ("[a\n", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(BadRequest, match=re.escape(needle)) as err:
            load_routes(path)
        assert str(path) in str(err.value)
    path.write_text('["qwen:72b"]\nurl = "http://gpu:8000/v1/"\napi_key_env = "LOCALLLM_TEST_UNSET_KEY"\n')
    route = load_routes(path)["qwen:72b"]
    assert (route.url, route.model) == ("http://gpu:8000/v1", "qwen:72b")
    with pytest.raises(BadRequest, match=r"\$LOCALLLM_TEST_UNSET_KEY, which is not set"):
        route.api_key()
