"""Safety of `localllm serve`: binding, API keys, CORS, body limits and the queue limit.

One server with `--api-key`, `--cors-origin`, `--max-body 64KiB` and
`--max-queue 1`, and no model preloaded: the starter loads on the first
request that names it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import ollama
import openai
import pytest

from server_harness import ROOT, make_store, start_server, served

KEY = "s3cret-key"
ORIGIN = "http://app.example"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("security-home")
    make_store(home, {"starter": starter_gguf})
    srv = start_server(
        home, "--api-key", KEY, "--cors-origin", ORIGIN, "--max-body", "64KiB", "--parallel", "1", "--max-queue", "1", "--ctx", "512",
        "--threads", "1",
    )
    yield from served(srv)


def serve_cli(home, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALLLM_HOME": str(home)}
    env.pop("LOCALLLM_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "localllm", "serve", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


# -- binding ------------------------------------------------------------------------------


def test_non_loopback_host_without_a_key_exits_at_once(tmp_path):
    started = time.monotonic()
    result = serve_cli(tmp_path, "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to serve 0.0.0.0 without an API key")
    assert "--api-key" in lines[0] and "--insecure-no-auth" in lines[0]
    assert time.monotonic() - started < 30 and not (tmp_path / "models").exists()  # nothing was loaded


def test_insecure_no_auth_serves_loudly(tmp_path):
    srv = start_server(tmp_path, "--host", "0.0.0.0", "--insecure-no-auth")
    try:
        assert "WARNING: serving 0.0.0.0 without an API key" in srv.log_text()
        port = srv.url.rsplit(":", 1)[1]
        assert httpx.get(f"http://127.0.0.1:{port}/api/tags").status_code == 200
    finally:
        srv.stop()


def test_bad_flags_are_one_line_errors(tmp_path):
    result = serve_cli(tmp_path, "--keep-alive", "soon", "--port", "0")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --keep-alive must be a duration such as 5m, 30s or -1, got 'soon'"
    ]
    result = serve_cli(tmp_path, "ghost-model", "--port", "0")
    assert result.returncode == 1 and "ghost-model" in result.stderr and "Traceback" not in result.stderr


def test_health_says_loading_then_ready_and_503_when_the_model_failed(tmp_path, starter_gguf):
    from server_harness import copy_with_renamed_key

    broken = copy_with_renamed_key(starter_gguf, tmp_path / "broken.gguf", "gemma3.attention.layer_norm_rms_epsilon")
    make_store(tmp_path, {"starter": starter_gguf, "broken": broken})
    srv = start_server(tmp_path, "starter", "--threads", "1", wait_healthy=False)
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not seen or seen[-1][0] != 200):
            try:
                r = httpx.get(f"{srv.url}/health", timeout=5)
                seen.append((r.status_code, r.json()["status"]))
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.02)
        assert seen[0] == (503, "loading") and seen[-1] == (200, "ok")
        assert set(seen) == {(503, "loading"), (200, "ok")}
    finally:
        srv.stop()
    srv = start_server(tmp_path, "broken", "--threads", "1", wait_healthy=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{srv.url}/health", timeout=5)
                if r.json()["status"] != "loading":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "failed" and "broken" in r.json()["error"]
        ok = httpx.post(f"{srv.url}/api/generate", json={"model": "starter", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
        assert ok.status_code == 200  # the server still serves other models
    finally:
        srv.stop()


# -- keys ----------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401_in_each_api_shape(server):
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key" and "missing" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/api/tags", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json() == {"error": "invalid API key"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=server.url).list()
    assert err.value.status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401


def test_the_right_key_opens_every_client(server):
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    assert [m.id for m in openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).models.list()] == ["starter"]
    assert [m.model for m in ollama.Client(host=server.url, headers=AUTH).list().models] == ["starter"]
    assert httpx.get(f"{server.url}/api/version", headers={"X-API-Key": KEY}).status_code == 200


# -- CORS ----------------------------------------------------------------------------------


def test_cors_only_for_the_named_origin(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{server.url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers  # refused before CORS
    r = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN


# -- body limit -------------------------------------------------------------------------------


def test_body_over_the_limit_is_413(server):
    big = {"model": "starter", "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and "65536-byte limit" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/api/chat", json=big, headers=AUTH)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "starter", "prompt": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}'

    r = httpx.post(f"{server.url}/api/generate", content=chunks(), headers=AUTH)
    assert r.status_code == 413 and "limit" in r.json()["error"]


# -- queue ---------------------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after_and_the_queue_drains(server):
    # A string of at least 400 characters: the grammar rules out an early end of the answer.
    long_json = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"]}
    body = {
        "model": "starter",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 500,
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": long_json}},
    }

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            streams, readers = [], []  # readers kept alive: a collected reader would close its connection
            for _ in range(2):  # one runs, one waits: --parallel 1 + --max-queue 1
                request = http.build_request("POST", "/v1/chat/completions", json=body)
                response = await http.send(request, stream=True)
                assert response.status_code == 200
                readers.append(response.aiter_lines())
                assert (await anext(readers[-1])).startswith("data: ")
                streams.append(response)
            third = await http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            ollama_third = await http.post("/api/generate", json={"model": "starter", "prompt": "x", "options": {"num_predict": 2}})
            for response in streams:
                await response.aclose()
            return third, ollama_third

    third, ollama_third = asyncio.run(scenario())
    assert third.status_code == 429 and third.headers["retry-after"] == "1"
    assert third.json()["error"]["type"] == "rate_limit_error" and "busy" in third.json()["error"]["message"]
    assert ollama_third.status_code == 429 and "busy" in ollama_third.json()["error"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    deadline = time.monotonic() + 20
    while True:  # the two closed streams free their places within moments
        try:
            r = client.chat.completions.create(model="starter", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert r.usage.completion_tokens == 2
