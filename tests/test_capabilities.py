"""capabilities.py on its own: what the starter's facts say a model can do, and the tools policy."""

from __future__ import annotations

import dataclasses

import pytest

from localllm.core.chat_template import builtin_template
from localllm.core.modelinfo import read_model_info
from localllm.server.capabilities import capabilities, drop_optional_tools, refuse_unsupported_tools, stop_tokens, used_template
from localllm.server.errors import APIError
from localllm.server.tools import plan_tools

from server_harness import TOOL_TEMPLATE, WEATHER_TOOL

QWEN3_LIKE = "{%- if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}{% if enable_thinking is false %}<think>\n\n</think>{% endif %}<|im_end|>"
R1_LIKE = "{% for m in messages %}{{ m.content }}{% endfor %}<｜Assistant｜><think>\n"


@pytest.fixture(scope="module")
def starter(starter_gguf):
    return read_model_info(starter_gguf)


def with_template(info, template):
    return dataclasses.replace(info, chat_template=template)


def test_capabilities_follow_the_template_in_use(starter):
    assert capabilities(starter) == ["completion"]  # the built-in Gemma template: no tools
    assert capabilities(with_template(starter, TOOL_TEMPLATE)) == ["completion", "tools"]
    assert capabilities(with_template(starter, QWEN3_LIKE)) == ["completion", "tools", "thinking"]
    assert capabilities(with_template(starter, R1_LIKE)) == ["completion", "thinking"]
    assert capabilities(with_template(starter, "   ")) == ["completion"]  # blank: the built-in one is used
    assert capabilities(dataclasses.replace(starter, pooling_type=1)) == ["embedding"]


def test_used_template_and_stops(starter):
    assert used_template(starter) == builtin_template("gemma3")[1]
    assert used_template(with_template(starter, TOOL_TEMPLATE)) == TOOL_TEMPLATE
    assert used_template(dataclasses.replace(starter, pooling_type=1)) == ""
    assert used_template(dataclasses.replace(starter, architecture="unknown-arch")) == ""
    assert stop_tokens(starter) == ["<eos>", "<end_of_turn>"]
    assert stop_tokens(with_template(starter, QWEN3_LIKE)) == ["<eos>", "<|im_end|>"]


def plan(choice, template=None):
    return plan_tools([WEATHER_TOOL], choice, parallel=True, template=template)


def test_optional_tools_are_dropped_only_where_the_template_cannot_take_them():
    dropped = drop_optional_tools(plan("auto"), "m")
    assert dropped.choice == "none" and dropped.grammar() == (None, [])
    assert dropped.prepare_messages([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    assert drop_optional_tools(plan(None), "m").choice == "none"
    assert drop_optional_tools(plan("required"), "m").choice == "required"
    named = drop_optional_tools(plan({"type": "function", "function": {"name": "get_weather"}}), "m")
    assert (named.choice, named.forced_name) == ("named", "get_weather")
    assert drop_optional_tools(plan("auto", TOOL_TEMPLATE), "m").choice == "auto"
    assert drop_optional_tools(None, "m") is None


def test_ollama_refuses_tools_a_template_cannot_take():
    with pytest.raises(APIError) as err:
        refuse_unsupported_tools(plan("auto"), "gemma3:270m")
    assert (err.value.status, err.value.message) == (400, "gemma3:270m does not support tools")
    assert refuse_unsupported_tools(plan("auto", TOOL_TEMPLATE), "m").native
    assert refuse_unsupported_tools(None, "m") is None
