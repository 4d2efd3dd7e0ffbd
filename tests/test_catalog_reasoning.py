"""The catalog's reasoning flag decides `think` when a request leaves it out, against a live server.

One file, the starter with a template that thinks only when `enable_thinking` is set
(as a Qwen3-style switch with the opposite default), is installed twice: as `qwen3:0.6b`,
which the catalog marks as reasoning, and under a name the catalog does not know. An
Ollama chat with no `think` then opens the thoughts for the first (the reply comes back
as `thinking`) and leaves the template's own default, no thinking, for the second.
"""

from __future__ import annotations

import ollama
import pytest

from server_harness import copy_with_string_key, make_store, start_server, served

ASK_FIRST_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
<start_of_turn>user
{{ message.content }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt %}<start_of_turn>model
{% if enable_thinking is defined and enable_thinking %}<think>
{% endif %}{% endif -%}
"""
CATALOG_NAME = "qwen3:0.6b"  # a reasoning entry in models/catalog.toml
OPTIONS = {"temperature": 0, "num_predict": 12}
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def oll(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("catalog-reasoning-home")
    files = tmp_path_factory.mktemp("catalog-reasoning-files")
    model = copy_with_string_key(starter_gguf, files / "asks-first.gguf", "tokenizer.chat_template", ASK_FIRST_TEMPLATE)
    make_store(home, {CATALOG_NAME: model, "asks-first": model})
    server = start_server(home, CATALOG_NAME, "--ctx", "512", "--max-loaded", "2", "--threads", "2")
    for srv in served(server):
        yield ollama.Client(host=srv.url, timeout=120)


def test_a_catalog_reasoning_model_thinks_when_the_request_does_not_say(oll):
    reply = oll.chat(model=CATALOG_NAME, messages=MESSAGES, options=OPTIONS)
    assert reply.message.thinking  # the prompt opened <think>: the reply is thoughts


def test_a_model_the_catalog_does_not_know_keeps_its_templates_default(oll):
    reply = oll.chat(model="asks-first", messages=MESSAGES, options=OPTIONS)
    assert not reply.message.thinking and reply.message.content


def test_think_false_still_wins_over_the_catalog(oll):
    reply = oll.chat(model=CATALOG_NAME, messages=MESSAGES, options=OPTIONS, think=False)
    assert not reply.message.thinking and reply.message.content


def test_show_lists_thinking_for_a_catalog_reasoning_model_whose_template_has_no_think_tags(starter_gguf):
    from localllm.core.modelinfo import read_model_info
    from localllm.server.capabilities import capabilities

    info = read_model_info(starter_gguf)  # Gemma's template: no <think>, no enable_thinking
    assert "thinking" not in capabilities(info)
    info.reasoning = True  # as ResolvedModel.info() sets it for an installed `gpt-oss:20b`
    assert "thinking" in capabilities(info)
