"""Thinking on or off through OpenAI's and Anthropic's APIs, and the tokens spent thinking, against a live server.

As in test_catalog_reasoning.py, one file whose template thinks only when `enable_thinking`
is set is installed twice: as `qwen3:0.6b` (the catalog marks it reasoning) and as
`asks-first` (unknown to the catalog). A request that says nothing thinks on the first and
not on the second; each API's own switch wins over that default, both ways.
"""

from __future__ import annotations

import anthropic
import openai
import pytest

from localllm.core.reasoning import ReplyReasoning
from localllm.core.requests import TokenEvent
from localllm.server.thinking import reasoning_tokens, split_tokens
from server_harness import copy_with_string_key, make_store, start_server, served
from test_catalog_reasoning import ASK_FIRST_TEMPLATE, CATALOG_NAME

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
MAX = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("reasoning-switch-home")
    files = tmp_path_factory.mktemp("reasoning-switch-files")
    model = copy_with_string_key(starter_gguf, files / "asks-first.gguf", "tokenizer.chat_template", ASK_FIRST_TEMPLATE)
    make_store(home, {CATALOG_NAME: model, "asks-first": model})
    srv = start_server(home, CATALOG_NAME, "--ctx", "512", "--max-loaded", "2", "--threads", "2")
    yield from served(srv)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


# -- OpenAI chat -----------------------------------------------------------------------------


def chat(oai, model: str, **extra):
    return oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX, temperature=0, **extra)


def thought(reply) -> str | None:
    return reply.choices[0].message.model_extra.get("reasoning_content")


@pytest.mark.parametrize(
    ("model", "extra", "thinks"),
    [
        (CATALOG_NAME, {}, True),  # unsaid: the catalog's flag
        ("asks-first", {}, False),  # unsaid, not in the catalog: the template's default
        (CATALOG_NAME, {"reasoning_effort": "none"}, False),
        (CATALOG_NAME, {"reasoning_effort": "minimal"}, False),
        ("asks-first", {"reasoning_effort": "low"}, True),
        ("asks-first", {"reasoning_effort": "high"}, True),
        (CATALOG_NAME, {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, False),
        ("asks-first", {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}, True),
        # chat_template_kwargs is the more specific word: it wins over reasoning_effort
        ("asks-first", {"reasoning_effort": "high", "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, False),
    ],
)
def test_openai_chat_thinks_as_the_request_or_the_catalog_says(oai, model, extra, thinks):
    reply = chat(oai, model, **extra)
    assert bool(thought(reply)) is thinks, reply
    details = reply.usage.completion_tokens_details
    assert (details.reasoning_tokens > 0) is thinks, reply.usage


def test_openai_chat_reasoning_tokens_count_the_thoughts(oai):
    reply = chat(oai, CATALOG_NAME)
    usage = reply.usage
    assert 0 < usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens
    if not reply.choices[0].message.content:  # cut while thinking: every token was a thought
        assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens

    stream = chat(oai, CATALOG_NAME, stream=True, stream_options={"include_usage": True})
    streamed = [c.usage for c in stream if c.usage is not None]
    assert len(streamed) == 1
    assert streamed[0].completion_tokens_details.reasoning_tokens == usage.completion_tokens_details.reasoning_tokens

    off = chat(oai, "asks-first")
    assert off.usage.completion_tokens_details.reasoning_tokens == 0 and off.usage.completion_tokens > 0


def test_reasoning_tokens_stop_where_the_answer_starts():
    """The closing tag and the blank after it are thoughts' tokens; the answer's are not."""
    pieces = ["<think>", "Hm", "m", "</", "think>", "\n\n", "Blue", " light", "."]
    events = [TokenEvent("r", text, [i]) for i, text in enumerate(pieces)]
    assert reasoning_tokens(ReplyReasoning(reasons=True), events) == 6
    assert reasoning_tokens(ReplyReasoning(reasons=True, inside=True), events[1:]) == 5
    assert reasoning_tokens(ReplyReasoning(reasons=True), events[6:]) == 0  # no thoughts at all
    assert reasoning_tokens(ReplyReasoning(reasons=False), events) == 0
    assert split_tokens(ReplyReasoning(reasons=True), events) == (6, events[6:])  # the answer's tokens carry its logprobs
    assert split_tokens(ReplyReasoning(reasons=True), events[:5]) == (5, [])  # cut while thinking: no answer


# -- Anthropic Messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "thinking", "thinks"),
    [
        (CATALOG_NAME, None, True),
        ("asks-first", None, False),
        (CATALOG_NAME, {"type": "disabled"}, False),
        ("asks-first", {"type": "enabled", "budget_tokens": 1024}, True),
    ],
)
def test_anthropic_thinks_as_the_request_or_the_catalog_says(claude, model, thinking, thinks):
    kw = {"thinking": thinking} if thinking is not None else {}
    message = claude.messages.create(model=model, max_tokens=MAX, messages=MESSAGES, extra_body={"temperature": 0}, **kw)
    assert ("thinking" in [b.type for b in message.content]) is thinks, message


# -- Responses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "reasoning", "thinks"),
    [
        (CATALOG_NAME, None, True),
        ("asks-first", None, False),
        (CATALOG_NAME, {"effort": "minimal"}, False),
        ("asks-first", {"effort": "high"}, True),
    ],
)
def test_responses_think_as_the_request_or_the_catalog_says(oai, model, reasoning, thinks):
    kw = {"reasoning": reasoning} if reasoning is not None else {}
    response = oai.responses.create(model=model, input="Why is the sky blue?", max_output_tokens=MAX, temperature=0, **kw)
    assert ("reasoning" in [item.type for item in response.output]) is thinks, response
    details = response.usage.output_tokens_details
    assert (details.reasoning_tokens > 0) is thinks, response.usage
    assert details.reasoning_tokens <= response.usage.output_tokens


def test_responses_stream_counts_the_same_reasoning_tokens(oai):
    kw = dict(model=CATALOG_NAME, input="Why is the sky blue?", max_output_tokens=MAX, temperature=0)
    whole = oai.responses.create(**kw)
    events = list(oai.responses.create(stream=True, **kw))
    final = events[-1].response  # response.completed, or .incomplete when max_output_tokens cut it
    assert final.usage.output_tokens_details.reasoning_tokens == whole.usage.output_tokens_details.reasoning_tokens > 0
