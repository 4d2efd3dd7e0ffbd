"""Reasoning and template variables through the remote backend, against a small real upstream.

The upstream is a Starlette app on uvicorn (127.0.0.1, its own thread) that
speaks OpenAI's streaming chat the way reasoning servers do: the model name
picks where its thoughts go (`reasoning_content` as vLLM and llama.cpp's server
send them, `reasoning` as Ollama's /v1 does, or raw ``<think>`` text inside
`content`). It records every request body, so a test can see what reached it.
A real `localllm serve` routes remote names to it; clients are the real SDKs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from server_harness import make_store, served, start_server

THOUGHTS = ["Two and two ", "make four."]
ANSWER = ["The answer ", "is 4."]
# the remote names the server knows, and where each one's upstream model puts its thoughts
STYLES = {"rc": "reasoning_content", "r": "reasoning", "tags": "content"}


class Upstream:
    """The small OpenAI-compatible server: streams a fixed reasoning reply, records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Upstream":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the upstream did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def sent(self, marker: str) -> dict[str, Any]:
        """The request body whose last message carries `marker`."""
        found = [r for r in self.requests if marker in str(r["messages"][-1].get("content"))]
        assert len(found) == 1, self.requests
        return found[0]

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": style, "object": "model", "owned_by": "vllm", "max_model_len": 4096} for style in STYLES
        ]})

    async def chat(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.requests.append(body)
        field = STYLES[body["model"]]
        return StreamingResponse(self._chunks(field), media_type="text/event-stream")

    async def _chunks(self, field: str):
        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> bytes:
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
            data = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": choices, "usage": usage}
            return f"data: {json.dumps(data)}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        if field == "content":
            pieces = ["<think>\n", *THOUGHTS, "\n</think>\n\n", *ANSWER]
            for piece in pieces:
                yield chunk({"content": piece})
        else:
            for piece in THOUGHTS:
                yield chunk({"content": None, field: piece})
            for piece in ANSWER:
                yield chunk({"content": piece})
        yield chunk({}, "stop")
        yield chunk({}, usage={"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16})
        yield b"data: [DONE]\n\n"


@pytest.fixture(scope="module")
def upstream():
    with Upstream() as up:
        yield up


@pytest.fixture(scope="module")
def server(tmp_path_factory, upstream):
    home = tmp_path_factory.mktemp("remote-reasoning-home")
    make_store(home, {})
    (home / "remotes.toml").write_text("".join(f'["{s}"]\nurl = "{upstream.url}"\n\n' for s in STYLES))
    yield from served(start_server(home))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def marked(text: str = "What is 2 + 2?") -> tuple[str, list[dict[str, str]]]:
    marker = uuid.uuid4().hex
    return marker, [{"role": "user", "content": f"{text} ({marker})"}]


@pytest.mark.parametrize("style", list(STYLES))
def test_openai_reply_carries_the_upstreams_reasoning_apart(client, style):
    _, messages = marked()
    message = client.chat.completions.create(model=style, messages=messages).choices[0].message
    assert message.content == "".join(ANSWER)
    assert message.reasoning_content == "".join(THOUGHTS)


@pytest.mark.parametrize("style", list(STYLES))
def test_openai_stream_carries_the_upstreams_reasoning_in_deltas(client, style):
    _, messages = marked()
    thoughts, answer = "", ""
    for chunk in client.chat.completions.create(model=style, messages=messages, stream=True):
        for choice in chunk.choices:
            thoughts += getattr(choice.delta, "reasoning_content", None) or ""
            answer += choice.delta.content or ""
    assert (thoughts, answer) == ("".join(THOUGHTS), "".join(ANSWER))


def test_ollama_chat_returns_thinking_and_sends_the_think_switch_upstream(server, upstream):
    for think in (True, False):
        marker, messages = marked()
        reply = httpx.post(f"{server.url}/api/chat", json={"model": "r", "messages": messages, "think": think, "stream": False}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["message"]["thinking"] == "".join(THOUGHTS)
        assert reply.json()["message"]["content"] == "".join(ANSWER)
        assert upstream.sent(marker)["chat_template_kwargs"] == {"enable_thinking": think}


def test_anthropic_and_responses_show_the_reasoning_as_their_own_blocks(server):
    _, messages = marked()
    answer = httpx.post(f"{server.url}/v1/messages", json={"model": "rc", "max_tokens": 64, "messages": messages}, timeout=60).json()
    assert [b["type"] for b in answer["content"]] == ["thinking", "text"], answer
    assert answer["content"][0]["thinking"] == "".join(THOUGHTS)
    _, messages = marked()
    response = httpx.post(f"{server.url}/v1/responses", json={"model": "rc", "input": messages[0]["content"]}, timeout=60).json()
    assert [item["type"] for item in response["output"]] == ["reasoning", "message"], response


def test_template_kwargs_and_reasoning_effort_reach_the_upstream(client, upstream):
    marker, messages = marked()
    client.chat.completions.create(
        model="rc", messages=messages, reasoning_effort="low",
        extra_body={"chat_template_kwargs": {"enable_thinking": False, "custom_flag": 3}},
    )
    sent = upstream.sent(marker)
    assert sent["chat_template_kwargs"] == {"enable_thinking": False, "custom_flag": 3}
    assert sent["reasoning_effort"] == "low"


def test_a_plain_request_sends_no_template_kwargs(client, upstream):
    marker, messages = marked()
    client.chat.completions.create(model="rc", messages=messages)
    sent = upstream.sent(marker)
    assert "chat_template_kwargs" not in sent and "reasoning_effort" not in sent
