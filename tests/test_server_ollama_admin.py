"""Ollama's model management (copy, delete, create, blobs, push) through the official `ollama` client
and raw httpx, against a live `localllm serve` holding the starter model."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from urllib.parse import urlparse

import httpx
import ollama
import pytest

from server_harness import make_store, start_server, served


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("ollama-admin-home")


@pytest.fixture(scope="module")
def server(home, starter_gguf):
    make_store(home, {"starter": starter_gguf})
    srv = start_server(home, "--ctx", "512", "--max-loaded", "2", "--threads", "1")
    yield from served(srv)


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=120)


def names(client) -> set[str]:
    return {m.model for m in client.list().models}


def delete_raw(server, model: str, **headers: str) -> httpx.Response:
    return httpx.request("DELETE", f"{server.url}/api/delete", json={"model": model}, headers=headers, timeout=30)


def status_of(call) -> tuple[int, str]:
    with pytest.raises(ollama.ResponseError) as caught:
        call()
    return caught.value.status_code, caught.value.error


# -- copy and delete ---------------------------------------------------------------------


def test_copy_is_listed_with_the_same_digest_and_delete_keeps_the_original(server, client):
    assert client.copy("starter:latest", "twin").status == "success"
    listed = {m.model: m for m in client.list().models}
    assert listed["twin"].digest == listed["starter"].digest and listed["twin"].size == listed["starter"].size
    assert client.delete("starter").status == "success"  # the original goes; the copy keeps its file
    assert names(client) == {"twin"}
    reply = client.generate(model="twin", prompt="The capital of France is", options={"temperature": 0, "num_predict": 2})
    assert reply.eval_count == 2
    client.copy("twin", "starter")
    client.delete("twin")
    assert names(client) == {"starter"}


def test_copy_and_delete_refusals(server, client):
    assert status_of(lambda: client.copy("no-such-model", "x"))[0] == 404
    assert status_of(lambda: client.copy("starter", "bad\x01name"))[0] == 400
    assert status_of(lambda: client.delete("no-such-model"))[0] == 404
    assert delete_raw(server, "").status_code == 400
    r = httpx.request("DELETE", f"{server.url}/api/delete", json={"name": "no-such-model"})  # older clients' field
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]


def test_delete_unloads_an_idle_model_and_refuses_a_busy_one(server, client):
    client.copy("starter", "busy")
    stream = client.generate(model="busy", prompt="Once upon a time", stream=True, options={"temperature": 0, "num_predict": 400})
    next(iter(stream))  # the model is loaded and a request runs on it
    r = delete_raw(server, "busy")
    assert r.status_code == 409 and "in use" in r.json()["error"]
    assert "busy" in names(client)
    stream.close()  # the request ends; the model is idle again
    deadline = time.monotonic() + 60
    while (r := delete_raw(server, "busy")).status_code == 409 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200
    assert "busy" not in names(client) and "busy" not in {m.model for m in client.ps().models}
    assert "starter" in names(client)


def test_a_cross_site_delete_is_refused_and_changes_nothing(server, client):
    client.copy("starter", "kept")
    r = delete_raw(server, "kept", Origin="http://evil.example")
    assert r.status_code == 403
    assert "kept" in names(client)
    client.delete("kept")


# -- create from an installed model ------------------------------------------------------


def test_create_from_a_model_with_system_and_parameters(server, client):
    system = "You are a pirate. Answer in one word."
    lines = list(client.create(model="pirate", from_="starter", system=system, parameters={"temperature": 0, "num_predict": 3}, stream=True))
    assert lines[-1].status == "success" and all(line.status for line in lines)
    shown = client.show("pirate")
    assert f'SYSTEM """{system}"""' in shown.modelfile
    assert httpx.post(f"{server.url}/api/show", json={"model": "pirate"}).json()["system"] == system
    assert "num_predict" in shown.parameters and "PARAMETER temperature" in shown.modelfile
    question = [{"role": "user", "content": "What is the capital of France?"}]
    mine = client.chat(model="pirate", messages=question)  # no options: the model's own apply
    assert mine.eval_count == 3 and mine.done_reason == "length"
    explicit = client.chat(
        model="starter", messages=[{"role": "system", "content": system}, *question], options={"temperature": 0, "num_predict": 3}
    )
    assert (mine.prompt_eval_count, mine.message.content) == (explicit.prompt_eval_count, explicit.message.content)
    plain = client.chat(model="starter", messages=question, options={"temperature": 0, "num_predict": 3})
    assert plain.prompt_eval_count < mine.prompt_eval_count  # the system prompt is in pirate's prompt
    assert client.chat(model="pirate", messages=question, options={"num_predict": 5}).eval_count == 5  # the request wins
    own_system = client.chat(model="pirate", messages=[{"role": "system", "content": "Be brief."}, *question])
    assert own_system.prompt_eval_count < mine.prompt_eval_count  # a chat's own system message replaces the model's
    client.delete("pirate")
    assert "starter" in names(client)


def test_create_with_a_jinja_template(server, client):
    template = "{{ bos_token }}Question: {{ messages[-1]['content'] }}\nAnswer:"
    client.create(model="qa", from_="starter", template=template)
    shown = client.show("qa")
    assert shown.template == template and 'TEMPLATE """' in shown.modelfile
    reply = client.generate(model="qa", prompt="What is the capital of France?", options={"temperature": 0, "num_predict": 4})
    assert reply.prompt_eval_count < 20  # the short template, not Gemma's turns
    client.delete("qa")
    code, error = status_of(lambda: client.create(model="go", from_="starter", template="{{ .System }} {{ .Prompt }}"))
    assert code == 400 and "Jinja" in error
    assert status_of(lambda: client.create(model="broken", from_="starter", template="{% if %}"))[0] == 400
    assert "go" not in names(client) and "broken" not in names(client)


def test_create_refusals(server, client):
    assert status_of(lambda: client.create(model="q", from_="starter", quantize="q4_K_M"))[0] == 400
    assert status_of(lambda: client.create(model="q", from_="no-such-model"))[0] == 404
    assert status_of(lambda: client.create(model="q", from_="starter", parameters={"temperature": -1}))[0] == 400
    assert status_of(lambda: client.create(model="q", from_="starter", parameters={"no_such_option": 1}))[0] == 400
    r = httpx.post(f"{server.url}/api/create", json={"model": "q"})
    assert r.status_code == 400 and "'from'" in r.json()["error"]
    assert "q" not in names(client)


# -- blobs and create from files ---------------------------------------------------------


def test_create_from_an_uploaded_gguf(server, client, home, tiny_gguf):
    digest = client.create_blob(tiny_gguf)  # the client's own upload: POST /api/blobs/sha256:<hex>
    assert digest == "sha256:" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert httpx.head(f"{server.url}/api/blobs/{digest}").status_code == 200
    r = httpx.post(f"{server.url}/api/create", json={"model": "uploaded", "files": {"tiny.gguf": digest}})
    statuses = [json.loads(line)["status"] for line in r.text.splitlines()]
    assert r.status_code == 200 and statuses[-1] == "success"
    listed = {m.model: m for m in client.list().models}
    assert listed["uploaded"].digest == digest.removeprefix("sha256:")
    assert listed["uploaded"].details.family == "gemma3"
    client.delete("uploaded")
    assert "uploaded" not in names(client)
    assert not list((home / "models").glob("uploaded*"))


def test_upload_with_a_wrong_digest_is_400_and_leaves_nothing(server, home):
    wrong = "sha256:" + "0" * 64
    r = httpx.post(f"{server.url}/api/blobs/{wrong}", content=b"not what the digest says")
    assert r.status_code == 400 and "sha256" in r.json()["error"]
    assert httpx.head(f"{server.url}/api/blobs/{wrong}").status_code == 404
    assert not [p for p in (home / "blobs").iterdir() if not p.name.startswith("sha256-")]  # no partial file
    assert httpx.post(f"{server.url}/api/blobs/sha256:abc", content=b"x").status_code == 400
    r = httpx.post(f"{server.url}/api/create", json={"model": "m", "files": {"m.gguf": "sha256:" + "1" * 64}})
    assert r.status_code == 400 and "not been uploaded" in r.json()["error"]
    junk = b"a text file, not a GGUF"
    digest = "sha256:" + hashlib.sha256(junk).hexdigest()
    assert httpx.post(f"{server.url}/api/blobs/{digest}", content=junk).status_code == 201
    r = httpx.post(f"{server.url}/api/create", json={"model": "m", "files": {"m.gguf": digest}})
    assert r.status_code == 400 and "not a model file" in r.json()["error"] and str(home) not in r.json()["error"]


def test_an_upload_larger_than_the_free_disk_is_507(server):
    """Declared up front, it is refused before a byte is written."""
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(
            f"POST /api/blobs/sha256:{'2' * 64} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Length: {10**18}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        )
        head = conn.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 507"), head


def test_push_is_a_clear_error(client):
    code, error = status_of(lambda: client.push("starter"))
    assert code == 400 and "pushing models to a registry is not supported" in error


def test_deleting_the_start_up_model_leaves_no_way_to_its_files(tmp_path, starter_gguf):
    make_store(tmp_path, {"starter": starter_gguf, "first": starter_gguf})
    srv = start_server(tmp_path, "first", "--ctx", "256", "--threads", "1")
    try:
        client = ollama.Client(host=srv.url, timeout=120)
        assert "first" in {m.model for m in client.ps().models}
        assert client.delete("first").status == "success"
        code, error = status_of(lambda: client.generate(model="first", prompt="Hi", options={"num_predict": 1}))
        assert code == 404 and "installed models" in error and str(tmp_path) not in error  # a name, not a missing file
        assert client.generate(model="starter", prompt="Hi", options={"num_predict": 1}).eval_count == 1  # its file is kept
    finally:
        srv.stop()
    assert "Traceback" not in srv.log_text(), srv.log_text()
