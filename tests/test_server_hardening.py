"""A keyless `localllm serve` on 127.0.0.1 that web pages cannot drive and big requests cannot freeze.

One server for the module: the starter, plus `slow`, the starter with a chat
template that takes seconds to render (model work that must not run on the
event loop). The server's hub is a local socket that counts connections, so a
refused `/api/pull` can be shown not to have reached the store's download.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from server_harness import ROOT, copy_with_string_key, make_store, start_server, served

APP = "http://app.example"
EVIL = "http://evil.example"
PROXY = "llm.proxy.example"
# 800,000 loop steps that read the loop's state: about 1.5 s of pure template work (on a quiet 2-core machine).
SLOW_TEMPLATE = (
    "{% for i in range(800) %}{% for j in range(1000) %}{% if loop.index is divisibleby 7 %}{% set x = j %}{% endif %}"
    "{% endfor %}{% endfor %}"
    "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
)
BIG_BODY = "24MiB"


class HubProbe:
    """A port that counts the connections made to it: the server's hub, for pulls."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()  # the pull fails as "hub unreachable"; we only count it came

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def slow_gguf(starter_gguf, tmp_path_factory) -> Path:
    return copy_with_string_key(starter_gguf, tmp_path_factory.mktemp("slow") / "slow.gguf", "tokenizer.chat_template", SLOW_TEMPLATE)


@pytest.fixture(scope="module")
def hub_probe():
    probe = HubProbe()
    yield probe
    probe.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf, slow_gguf, hub_probe):
    home = tmp_path_factory.mktemp("hardening-home")
    make_store(home, {"starter": starter_gguf, "slow": slow_gguf})
    srv = start_server(
        home, "starter", "--ctx", "512", "--threads", "1", "--parallel", "2", "--max-loaded", "2",
        "--max-body", BIG_BODY, "--cors-origin", APP, "--allowed-host", PROXY,
        env={"HF_ENDPOINT": hub_probe.url, "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    yield from served(srv)


def port(server) -> str:
    return server.url.rsplit(":", 1)[1]


def loaded(server) -> list[str]:
    return [m["name"] for m in httpx.get(f"{server.url}/api/ps").json()["models"]]


# -- DNS rebinding: the Host check ---------------------------------------------------------------


def test_a_foreign_host_is_403_in_each_shape_and_pulls_nothing(server, hub_probe):
    evil = {"Host": f"evil.example:{port(server)}"}
    r = httpx.get(f"{server.v1}/models", headers=evil)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "evil.example" in r.json()["error"]["message"] and "--allowed-host" in r.json()["error"]["message"]
    before = hub_probe.connections
    r = httpx.post(f"{server.url}/api/pull", headers=evil, json={"model": "hf:evil/Model-GGUF:Q4_K_M", "stream": False})
    assert r.status_code == 403 and isinstance(r.json()["error"], str)
    r = httpx.post(f"{server.url}/api/generate", headers=evil, json={"model": "starter", "prompt": "Hi", "stream": False})
    assert r.status_code == 403
    # the probe works: the same pull, addressed properly, does reach the hub
    r = httpx.post(f"{server.url}/api/pull", json={"model": "hf:evil/Model-GGUF:Q4_K_M", "stream": False}, timeout=60)
    assert r.status_code == 502 and hub_probe.connections > before


def test_refused_pull_never_reaches_the_hub(server, hub_probe):
    before = hub_probe.connections
    for headers in ({"Host": "evil.example"}, {"Host": "127.0.0.1.nip.example"}, {"Host": "localhost.evil.example:80"}, {"Origin": EVIL}):
        r = httpx.post(f"{server.url}/api/pull", headers=headers, json={"model": "hf:evil/Model-GGUF:Q4_K_M"})
        assert r.status_code == 403, headers
    assert hub_probe.connections == before


def test_loopback_names_and_allowed_hosts_are_served(server):
    for host in ("localhost", f"localhost:{port(server)}", f"127.0.0.1:{port(server)}", f"[::1]:{port(server)}", "LOCALHOST.", PROXY, "127.0.0.2"):
        assert httpx.get(f"{server.url}/api/version", headers={"Host": host}).status_code == 200, host


def test_a_server_bound_elsewhere_checks_host_only_when_told(tmp_path):
    key = {"Authorization": "Bearer k"}
    for extra, evil_status in (((), 200), (("--allowed-host", PROXY), 403)):
        srv = start_server(tmp_path, "--host", "0.0.0.0", "--api-key-file", str(write_key(tmp_path)), *extra)
        try:
            url = f"http://127.0.0.1:{port(srv)}/api/version"
            assert httpx.get(url, headers={**key, "Host": "evil.example"}).status_code == evil_status
            assert httpx.get(url, headers={**key, "Host": PROXY}).status_code == 200
            assert httpx.get(url, headers={"Host": PROXY}).status_code == 401  # the key is still needed
        finally:
            srv.stop()


def write_key(folder: Path) -> Path:
    path = folder / "key"
    path.write_text("k\n")
    return path


def test_allowed_host_must_be_a_host_name(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "localllm", "serve", "--port", "0", "--allowed-host", "http://x.example:80/"],
        cwd=ROOT, env={**os.environ, "LOCALLLM_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --allowed-host takes a host name without a port or scheme, such as llm.example.com; got 'http://x.example:80/'"
    ]


# -- CSRF: the Origin check ------------------------------------------------------------------------


def test_a_cross_site_text_plain_post_is_403_and_changes_nothing(server):
    httpx.post(f"{server.url}/api/generate", json={"model": "starter", "prompt": ""}, timeout=60)  # loaded
    assert "starter" in loaded(server)
    page = {"Origin": EVIL, "Content-Type": "text/plain;charset=UTF-8", "Sec-Fetch-Site": "cross-site"}
    unload = json.dumps({"model": "starter", "keep_alive": 0})
    r = httpx.post(f"{server.url}/api/generate", content=unload, headers=page)
    assert r.status_code == 403 and "--cors-origin" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/chat", content=json.dumps({"model": "starter", "messages": [], "keep_alive": 0}), headers=page)
    assert r.status_code == 403
    r = httpx.post(f"{server.v1}/chat/completions", content=json.dumps({"model": "starter", "messages": [{"role": "user", "content": "x"}]}), headers=page)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "starter" in loaded(server)  # nothing was unloaded
    # no Origin, only the fetch metadata a browser adds to a cross-site request
    r = httpx.post(f"{server.url}/api/generate", content=unload, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert "starter" in loaded(server)


def test_the_allowed_origin_and_the_server_itself_may_call(server):
    preflight = {"Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = httpx.options(f"{server.v1}/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    r = httpx.get(f"{server.v1}/models", headers={"Origin": APP})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    r = httpx.get(f"{server.url}/api/tags", headers={"Origin": f"http://127.0.0.1:{port(server)}", "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200
    r = httpx.get(f"{server.url}/api/tags", headers={"Origin": f"http://localhost:{int(port(server)) + 1}"})
    assert r.status_code == 403  # another local port is another origin


def test_programs_without_origin_work_as_before(server):
    curl = shutil.which("curl")
    if curl:  # curl -d sends application/x-www-form-urlencoded; Ollama's routes read it as JSON anyway
        out = subprocess.run(
            [curl, "-s", "-w", "\n%{http_code}", f"{server.url}/api/generate",
             "-d", '{"model": "starter", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}}'],
            capture_output=True, text=True, timeout=120,
        )
        body, status = out.stdout.rsplit("\n", 1)
        assert status == "200" and json.loads(body)["done"] is True
    form = httpx.post(
        f"{server.url}/api/generate", content=b'{"model": "starter", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}}',
        headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=120,
    )
    assert form.status_code == 200
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="starter", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert ollama.Client(host=server.url, timeout=120).generate(model="starter", prompt="Hi", options={"num_predict": 2}).done


# -- bad text: a 400, never a 500 ------------------------------------------------------------------------


def test_lone_surrogates_are_400_in_each_shape(server):
    lone = '"a\\ud800b"'
    cases = [
        (f"{server.v1}/chat/completions", '{"model": "starter", "messages": [{"role": "user", "content": %s}]}' % lone),
        (f"{server.v1}/completions", '{"model": "starter", "prompt": %s}' % lone),
        (f"{server.url}/api/generate", '{"model": "starter", "prompt": %s, "stream": false}' % lone),
        (f"{server.url}/api/chat", '{"model": "starter", "messages": [{"role": "user", "content": %s}]}' % lone),
        (f"{server.url}/api/show", '{"model": %s}' % lone),
    ]
    for url, body in cases:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (url, r.text)
        message = r.json()["error"] if "/api/" in url else r.json()["error"]["message"]
        assert "lone surrogate" in message
    ok = '{"model": "starter", "prompt": "\\ud83d\\ude00", "stream": false, "options": {"num_predict": 1}}'  # a valid pair
    assert httpx.post(f"{server.url}/api/generate", content=ok, timeout=60).status_code == 200


def test_bad_model_names_are_400(server):
    for name in ("m" * 256, "é" * 130, "star\nter", "star\x00ter", "tab\there"):
        r = httpx.post(f"{server.v1}/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "'model'" in r.json()["error"]["message"], (name, r.text)
        r = httpx.post(f"{server.url}/api/show", json={"model": name})
        assert r.status_code == 400, (name, r.text)
        r = httpx.post(f"{server.url}/api/pull", json={"model": name})
        assert r.status_code == 400, (name, r.text)
    r = httpx.get(f"{server.v1}/models/{'m' * 255}")
    assert r.status_code == 404  # long but allowed: simply not installed


def test_a_model_name_never_probes_the_working_directory(server):
    """The server runs in the repository root: README.md and models/ exist there, ghost.md does not."""
    assert (ROOT / "README.md").is_file() and (ROOT / "models").is_dir() and not (ROOT / "ghost.md").exists()
    answers = {}
    for name in ("README.md", "models", "ghost.md", "pyproject.toml"):
        r = httpx.post(f"{server.url}/api/show", json={"model": name})
        v1 = httpx.post(f"{server.v1}/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}]})
        quoted = f"'{name}'"
        answers[name] = (r.status_code, r.json()["error"].replace(quoted, "NAME"), v1.status_code, v1.json()["error"]["message"].replace(quoted, "NAME"))
    assert len(set(answers.values())) == 1, answers
    assert answers["ghost.md"][0] == 404 and answers["ghost.md"][2] == 404


# -- cheap limits ------------------------------------------------------------------------------------------


def test_message_and_prompt_limits_are_400s_that_name_them(server):
    many = [{"role": "user", "content": "x"}] * 600  # the context holds 512 tokens
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": "starter", "messages": many})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages" and "512" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/api/chat", json={"model": "starter", "messages": [{"role": "user", "content": "x"}] * 20_000})
    assert r.status_code == 400 and "at most 16384" in r.json()["error"]
    wizard = [{"role": "user", "content": "x"}] * 10_000 + [{"role": "wizard", "content": "x"}]  # a big body, validated off the loop
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": "starter", "messages": wizard})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[10000].role"
    long = "word " * 4000  # 20,000 characters: more than 512 tokens x 32
    r = httpx.post(f"{server.v1}/completions", json={"model": "starter", "prompt": long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long" and "16384" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/api/generate", json={"model": "starter", "prompt": long, "stream": False})
    assert r.status_code == 400 and "characters" in r.json()["error"]


# -- the event loop stays free -------------------------------------------------------------------------


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def huge_requests(server) -> list[tuple[str, bytes]]:
    """A slow template, a 200,000-message body and a multi-MB prompt: seconds of preparation."""
    messages = json.dumps({"model": "starter", "messages": [{"role": "user", "content": "hello there"}] * 200_000})
    prompt = json.dumps({"model": "starter", "prompt": "lorem ipsum " * 600_000, "stream": False})
    slow = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    return [
        (f"{server.v1}/chat/completions", slow.encode()),
        (f"{server.v1}/chat/completions", messages.encode()),
        (f"{server.url}/api/generate", prompt.encode()),
    ]


def send_in_background(url: str, body: bytes, results: list) -> threading.Thread:
    def send() -> None:
        try:
            results.append(httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=120).status_code)
        except httpx.HTTPError as exc:
            results.append(type(exc).__name__)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_health_and_metrics_answer_within_a_second_while_requests_are_prepared(server):
    assert len(huge_requests(server)[1][1]) > 5_000_000 and len(huge_requests(server)[2][1]) > 5_000_000
    results: list = []
    threads = [send_in_background(url, body, results) for url, body in huge_requests(server)]
    slowest, polls, saw_preparing = 0.0, 0, False
    while any(t.is_alive() for t in threads):
        for path in ("/health", "/metrics"):
            started = time.monotonic()
            r = httpx.get(f"{server.url}{path}", timeout=10)
            slowest = max(slowest, time.monotonic() - started)
            assert r.status_code == 200
            polls += 1
            if path == "/metrics" and "localllm_requests_preparing 0.0" not in r.text:
                saw_preparing = True
    assert saw_preparing and polls >= 6, (polls, results)
    assert slowest < 1.0, f"/health or /metrics took {slowest:.2f} s"
    # the two huge bodies are refused by the cheap limits; the slow template finishes (or ends over a budget)
    assert len(results) == 3 and results.count(400) >= 2 and set(results) <= {200, 400}, results


def test_sigterm_ends_the_server_within_5_s_under_load(tmp_path, starter_gguf, slow_gguf):
    """Two streams generating, the slow template being rendered, a huge body arriving: SIGTERM, gone in 5 s."""
    make_store(tmp_path, {"starter": starter_gguf, "slow": slow_gguf})
    srv = start_server(tmp_path, "slow", "--ctx", "2048", "--threads", "1", "--parallel", "2", "--max-loaded", "2", "--max-body", BIG_BODY)
    streams: list = []  # every line of both streams
    finals: list = []  # the last line of each

    def stream() -> None:  # a long generation, read as it comes
        body = {"model": "starter", "prompt": "Once upon a time", "options": {"num_predict": 1500}}
        line = ""
        try:
            with httpx.stream("POST", f"{srv.url}/api/generate", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    streams.append(line)
        except httpx.HTTPError as exc:
            line = type(exc).__name__
        finals.append(line)

    try:
        readers = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
        for reader in readers:
            reader.start()
        slow_url, slow_body = huge_requests(srv)[0]
        huge_url, huge_body = huge_requests(srv)[1]
        # The slow template renders for up to its 2 s budget; on a loaded machine the streams may
        # take longer to start, so it is sent again whenever it ends before they do.
        slow_results: list = []
        slow = send_in_background(slow_url, slow_body, slow_results)
        deadline = time.monotonic() + 60
        while not (len(streams) >= 4 and slow.is_alive() and metric(srv, "localllm_requests_preparing") >= 1):
            assert time.monotonic() < deadline, (len(streams), slow_results)
            if not slow.is_alive():
                slow = send_in_background(slow_url, slow_body, slow_results)
            time.sleep(0.05)
        send_in_background(huge_url, huge_body, [])
        started = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        srv.process.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        if srv.process.poll() is None:
            srv.process.kill()
    assert took < 5.0, f"SIGTERM took {took:.1f} s"
    for reader in readers:
        reader.join(timeout=30)
    assert len(finals) == 2 and all(json.loads(line)["done"] is True for line in finals), finals  # ended, not cut
    assert "still stopping" not in srv.log_text(), srv.log_text()  # a clean stop, not the backstop
    assert "Traceback" not in srv.log_text(), srv.log_text()


# -- keys off the command line ---------------------------------------------------------------------------


def serve_cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "LOCALLLM_API_KEY"} | {"LOCALLLM_HOME": str(home)} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "localllm", "serve", "--port", "0", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60
    )


def test_the_key_comes_from_a_file_or_the_environment_and_on_the_command_line_it_warns(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("  from-a-file \nsecond line ignored\n")
    for args, env, key in (
        (("--api-key-file", str(key_file)), None, "from-a-file"),
        ((), {"LOCALLLM_API_KEY": "from-the-env"}, "from-the-env"),
        (("--api-key", "on-the-line"), None, "on-the-line"),
    ):
        srv = start_server(tmp_path, *args, env=env)
        try:
            assert httpx.get(f"{srv.v1}/models").status_code == 401
            assert httpx.get(f"{srv.v1}/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            warned = [line for line in srv.log_text().splitlines() if "process list" in line]
        finally:
            srv.stop()
        if args[:1] == ("--api-key",):
            assert warned == [
                "warning: --api-key is visible to other users of this machine in the process list; "
                "use --api-key-file PATH or LOCALLLM_API_KEY instead"
            ]
        else:
            assert warned == []


def test_an_unusable_key_file_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n\n")
    cases = {
        str(tmp_path / "missing"): f"error: cannot read --api-key-file {tmp_path / 'missing'}: No such file or directory",
        str(empty): f"error: --api-key-file {empty} is empty: put the key on its first line",
        str(tmp_path): f"error: cannot read --api-key-file {tmp_path}: Is a directory",
    }
    for path, line in cases.items():
        result = serve_cli(tmp_path, "--api-key-file", path)
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [line], result.stderr
    result = serve_cli(tmp_path, "--api-key-file", str(empty), "--api-key", "k")
    assert result.returncode == 1 and "not both" in result.stderr
