"""Reasoning models through every API family, against a live `localllm serve`, with the official SDKs.

The model is a copy of the starter whose GGUF carries a Qwen3-style template
(`thinker`): its generation prompt ends inside `<think>`, and it takes
`enable_thinking` to close the thoughts at once. A few earlier turns show the
base model the pattern; greedy sampling then makes it think one line, close the
tag (spread over several tokens, as `</think>` is plain text in Gemma's
vocabulary) and answer. No test expects particular words: each checks the
shape, that no tag leaks, and that streamed pieces add up to the whole reply.
"""

from __future__ import annotations

import os
import subprocess
import sys

import anthropic
import httpx
import ollama
import openai
import pytest

from server_harness import copy_with_string_key, make_store, start_server, served

# Gemma turns with Qwen3's thinking switch, written for these tests.
THINK_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
<start_of_turn>model
{{ message.content }}<end_of_turn>
{% else -%}
<start_of_turn>user
{{ message.content }}<end_of_turn>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<start_of_turn>model
<think>
{% if enable_thinking is defined and enable_thinking is false %}
</think>

{% endif %}{% endif -%}
"""

FEW_SHOT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nTwo plus two is four.\n</think>\n\nFour."},
    {"role": "user", "content": "What is 3+3?"},
    {"role": "assistant", "content": "<think>\nThree plus three is six.\n</think>\n\nSix."},
    {"role": "user", "content": "What is 4+4?"},
    {"role": "assistant", "content": "<think>\nFour plus four is eight.\n</think>\n\nEight."},
    {"role": "user", "content": "What is 5+5?"},
]
MAX = 24  # room for the thought and the answer; the base model may ramble after it


@pytest.fixture(scope="module")
def home(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("reasoning-home")
    files = tmp_path_factory.mktemp("reasoning-files")
    thinker = copy_with_string_key(starter_gguf, files / "thinker.gguf", "tokenizer.chat_template", THINK_TEMPLATE)
    make_store(home, {"thinker": thinker, "starter": starter_gguf})
    return home


@pytest.fixture(scope="module")
def server(home):
    srv = start_server(home, "thinker", "--ctx", "1024", "--max-loaded", "2", "--threads", "2")
    yield from served(srv)


def no_tags(*texts: str | None) -> bool:
    return all("<think>" not in (t or "") and "</think>" not in (t or "") and "think>" not in (t or "") for t in texts)


# -- OpenAI chat ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def test_openai_chat_separates_reasoning_content(oai):
    reply = oai.chat.completions.create(model="thinker", messages=FEW_SHOT, max_tokens=MAX, temperature=0)
    message = reply.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content, message
    assert no_tags(reasoning, message.content)

    stream = oai.chat.completions.create(model="thinker", messages=FEW_SHOT, max_tokens=MAX, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    streamed_reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)
    first_thought = next(i for i, d in enumerate(deltas) if (d.model_extra or {}).get("reasoning_content"))
    first_answer = next(i for i, d in enumerate(deltas) if d.content)
    assert first_thought < first_answer  # thoughts arrive as they are generated, before the answer


def test_openai_thoughts_cut_by_max_tokens_stay_reasoning(oai):
    reply = oai.chat.completions.create(model="thinker", messages=FEW_SHOT, max_tokens=3, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.model_extra["reasoning_content"] and choice.message.content == ""


def test_openai_enable_thinking_false_renders_thinking_off(oai):
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        reply = oai.chat.completions.create(model="thinker", messages=FEW_SHOT, max_tokens=4, temperature=0, extra_body=extra)
        message = reply.choices[0].message
        assert message.model_extra["reasoning_content"] is None and message.content, (extra, message)

    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs.messages"):
        oai.chat.completions.create(model="thinker", messages=FEW_SHOT, max_tokens=4, extra_body={"chat_template_kwargs": {"messages": []}})


def test_openai_json_output_is_answer_not_thoughts(oai):
    reply = oai.chat.completions.create(
        model="thinker", messages=FEW_SHOT, max_tokens=MAX, temperature=0, response_format={"type": "json_object"}
    )
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] is None and message.content.startswith("{"), message


def test_openai_model_without_reasoning_has_no_reasoning_field(oai):
    reply = oai.chat.completions.create(model="starter", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})


# -- Ollama ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.url, timeout=120)


def test_ollama_chat_think_returns_thinking(oll):
    options = {"temperature": 0, "num_predict": MAX}
    reply = oll.chat(model="thinker", messages=FEW_SHOT, think=True, options=options)
    assert reply.message.thinking and reply.message.content
    assert no_tags(reply.message.thinking, reply.message.content)
    parts = list(oll.chat(model="thinker", messages=FEW_SHOT, think=True, options=options, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == reply.message.thinking
    assert "".join(p.message.content or "" for p in parts) == reply.message.content

    off = oll.chat(model="thinker", messages=FEW_SHOT, think=False, options={"temperature": 0, "num_predict": 4})
    assert not off.message.thinking and off.message.content


def test_ollama_generate_returns_thinking_and_the_line_chat_prints_the_same(oll, home):
    reply = oll.generate(model="thinker", prompt="Why is the sky blue?", think=True, options={"temperature": 0, "num_predict": 6})
    assert reply.thinking and reply.response == "" and reply.done_reason == "length"  # cut while thinking

    env = {**os.environ, "LOCALLLM_HOME": str(home)}
    chat = subprocess.run(
        [sys.executable, "-m", "localllm", "chat", "thinker", "--temperature", "0", "--max-tokens", "6"],
        input="Why is the sky blue?\n/bye\n", capture_output=True, text=True, env=env, timeout=180,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.replace(">>> ", "") == reply.thinking + "\n"  # piped, not a terminal: the thoughts plain
    run = subprocess.run(
        [sys.executable, "-m", "localllm", "run", "thinker", "Why is the sky blue?", "--temperature", "0", "--max-tokens", "6"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert run.returncode == 0 and run.stdout == reply.thinking + "\n", run.stderr


def test_ollama_think_on_a_model_that_cannot_think_is_refused(oll, server):
    with pytest.raises(ollama.ResponseError, match="does not support thinking") as caught:
        oll.chat(model="starter", messages=[{"role": "user", "content": "x"}], think=True)
    assert caught.value.status_code == 400
    raw = httpx.post(f"{server.url}/api/generate", json={"model": "starter", "prompt": "x", "think": True, "stream": False})
    assert raw.status_code == 400 and "does not support thinking" in raw.json()["error"]


# -- Anthropic ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_anthropic_thinking_blocks(claude):
    kw = dict(model="thinker", max_tokens=MAX, messages=FEW_SHOT, extra_body={"temperature": 0})
    message = claude.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **kw)
    kinds = [b.type for b in message.content]
    assert kinds[:2] == ["thinking", "text"], message
    assert no_tags(message.content[0].thinking, message.content[1].text)

    with claude.messages.stream(thinking={"type": "enabled", "budget_tokens": 1024}, **kw) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "thinking_delta" in deltas and deltas.index("thinking_delta") < deltas.index("text_delta")
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]

    off = claude.messages.create(thinking={"type": "disabled"}, **{**kw, "max_tokens": 4})
    assert [b.type for b in off.content] == ["text"]


def test_anthropic_reply_cut_while_thinking_is_one_closed_thinking_block(claude):
    kw = dict(model="thinker", max_tokens=3, messages=FEW_SHOT, extra_body={"temperature": 0})
    message = claude.messages.create(**kw)
    assert [b.type for b in message.content] == ["thinking"] and message.stop_reason == "max_tokens"
    with claude.messages.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]


# -- Responses -----------------------------------------------------------------------------------


def test_responses_reasoning_item_before_the_message(oai):
    kw = dict(model="thinker", input=FEW_SHOT, max_output_tokens=MAX, temperature=0)
    response = oai.responses.create(**kw)
    kinds = [item.type for item in response.output]
    assert kinds[:2] == ["reasoning", "message"], response.output
    thoughts = response.output[0].content[0].text
    assert thoughts and response.output_text and no_tags(thoughts, response.output_text)

    with oai.responses.stream(**kw) as stream:
        events = list(stream)
    assert events[-1].type == f"response.{response.status}"  # incomplete when max_output_tokens cut the ramble after the answer
    final = events[-1].response
    types = [e.type for e in events]
    assert "response.reasoning_text.delta" in types
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == thoughts
    assert [i.type for i in final.output] == kinds and final.output_text == response.output_text
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]

    off = oai.responses.create(**{**kw, "max_output_tokens": 4}, reasoning={"effort": "none"})
    assert [item.type for item in off.output] == ["message"]
