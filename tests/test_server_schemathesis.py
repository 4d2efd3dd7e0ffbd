"""Schemathesis against the live server's /openapi.json: valid and invalid requests, never a 5xx.

Every route runs (except /api/pull, which would reach for the network), with
positive and negative examples. Generation routes get the starter as their
model, a 256-token context and at most 4 generated tokens, so the requests
are cheap but pass through every check a real one does: sampling values,
stop strings, grammars from schemas, tools, templates. Loading options (keep_alive, num_ctx) are left out: each
would reload the model, and test_server_ollama covers them.
"""

from __future__ import annotations

import pytest
import schemathesis
from schemathesis import GenerationMode

from server_harness import make_store, start_server, served

MAX_EXAMPLES = 10
GENERATION_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
}
EMBEDDING_PATHS = {"/v1/embeddings", "/api/embed", "/api/embeddings"}  # nothing generated: no token limit to add
SMALL = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("schemathesis-home")
    make_store(home, {"starter": starter_gguf})
    srv = start_server(home, "starter", "--ctx", "256", "--max-queue", "256", "--threads", "1")
    yield from served(srv)


def cheap(path: str, body):
    """The starter, a handful of tokens, no reloads (applied to every case, whatever phase made it)."""
    if not isinstance(body, dict) or path not in GENERATION_PATHS:
        return body
    if isinstance(body.get("model"), str):
        body["model"] = "starter"
    body.pop("keep_alive", None)
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > SMALL:
            body[key] = SMALL
    if path in EMBEDDING_PATHS:
        if isinstance(body.get("options"), dict):
            body["options"].pop("num_ctx", None)
        return body
    if path.startswith("/v1/") and all(body.get(k) is None for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")):
        body["max_output_tokens" if path == "/v1/responses" else "max_tokens"] = SMALL  # absent or null: no limit but the context
    if path.startswith("/api/"):
        options = body.setdefault("options", {})
        if options is None:
            options = body["options"] = {}
        if isinstance(options, dict):
            options.pop("num_ctx", None)
            predict = options.get("num_predict")
            if not isinstance(predict, int) or isinstance(predict, bool) or predict > SMALL or predict in (-1, -2):
                options["num_predict"] = SMALL
    return body


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/api/pull")


@schema.parametrize()
def test_no_server_errors(case, server):
    case.body = cheap(case.path, case.body)
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}"
