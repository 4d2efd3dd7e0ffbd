"""Harmony (gpt-oss) replies: analysis is reasoning, final is the answer, function calls are tool calls.

The splitter is fed whole replies, one character at a time and cut in two at every
position, and no piece of a marker may reach either side. A live server with the
starter under a harmony chat template checks that such a model is read as a
reasoning model through the openai and ollama SDKs (the starter writes no markers
itself, so the split is proven here by the unit tests).
"""

from __future__ import annotations

import ollama
import openai
import pytest

from localllm.core.harmony import MARKERS, HarmonyStream, prompt_header, split_harmony, template_is_harmony
from localllm.core.reasoning import ReplyReasoning, template_reasons
from localllm.core.requests import SamplingParams
from localllm.server.tools import plan_tools
from server_harness import copy_with_string_key, make_store, served, start_server

THOUGHTS = "The user says hello. I should greet them back."
ANSWER = "Hello there! How can I help?"
REPLY = (
    f"<|channel|>analysis<|message|>{THOUGHTS}<|end|>"
    f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>"
)
CALL_REPLY = (
    "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
    '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
)
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}

# A harmony chat template written for these tests (system, developer, user and assistant turns).
HARMONY_TEMPLATE = r"""<|start|>system<|message|>You are a helpful assistant.
Reasoning: medium

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{%- for message in messages -%}
{%- if message.role == 'system' -%}<|start|>developer<|message|># Instructions

{{ message.content }}<|end|>
{%- elif message.role == 'user' -%}<|start|>user<|message|>{{ message.content }}<|end|>
{%- elif message.role == 'assistant' -%}
{%- if message.thinking is defined and message.thinking -%}<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>{%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}
"""


def streamed(pieces: list[str], header: str | None = "assistant") -> tuple[str, str, list[str]]:
    """Feed pieces one by one: (reasoning, answer, every piece shown on the way)."""
    stream = HarmonyStream(header=header)
    outs = [stream.feed(piece) for piece in pieces] + [stream.flush()]
    shown = [o.reasoning for o in outs] + [o.answer for o in outs]
    return "".join(o.reasoning for o in outs), "".join(o.answer for o in outs), shown


def no_marker_piece(shown: list[str]) -> bool:
    """No piece shown holds a marker or the start or end of one."""
    return not any("<|" in s or "|>" in s or any(m in s for m in MARKERS) for s in shown) and not any(
        s.endswith("<") for s in shown
    )


def test_a_whole_reply_splits_into_thoughts_and_answer():
    split = split_harmony(REPLY)
    assert (split.reasoning, split.answer) == (THOUGHTS, ANSWER)


def test_a_reply_streamed_one_character_at_a_time_splits_the_same():
    reasoning, answer, shown = streamed(list(REPLY))
    assert (reasoning, answer) == (THOUGHTS, ANSWER)
    assert no_marker_piece(shown)


def test_markers_cut_at_every_position_never_leak():
    for at in range(len(REPLY) + 1):
        reasoning, answer, shown = streamed([REPLY[:at], REPLY[at:]])
        assert (reasoning, answer) == (THOUGHTS, ANSWER), at
        assert no_marker_piece(shown), at


def test_a_reply_cut_by_max_tokens_inside_its_analysis_is_all_reasoning():
    cut = REPLY[: REPLY.index("<|end|>") - 5]  # the end of the thoughts never came
    for pieces in ([cut], list(cut)):
        reasoning, answer, shown = streamed(pieces)
        assert reasoning == THOUGHTS[:-5] and answer == ""
        assert no_marker_piece(shown)


def test_a_reply_cut_inside_a_marker_shows_nothing_of_it():
    cut = REPLY[: REPLY.index("<|end|>") + 3]
    reasoning, answer, shown = streamed(list(cut))
    assert reasoning == THOUGHTS and answer == "" and no_marker_piece(shown)


def test_a_final_message_without_analysis_is_all_answer():
    stream = HarmonyStream()
    out = stream.feed(f"<|channel|>final<|message|>{ANSWER}")
    rest = stream.flush()
    assert (out.reasoning + rest.reasoning, out.answer + rest.answer) == ("", ANSWER)
    assert not stream.reasoned


def test_two_analysis_messages_are_kept_apart():
    text = "<|channel|>analysis<|message|>First.<|end|><|start|>assistant<|channel|>analysis<|message|>Second.<|end|>"
    assert split_harmony(text).reasoning == "First.\n\nSecond."


def test_a_commentary_preamble_without_a_recipient_is_answer():
    text = "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    assert split_harmony(text).answer == "Let me check.\n\nDone."


def test_a_reply_that_does_not_follow_the_format_is_all_answer():
    for text in ("Plain words, no markers.", "<b>bold</b> text", "x" * 300):
        reasoning, answer, _ = streamed(list(text))
        assert (reasoning, answer) == ("", text)


def test_a_header_that_never_ends_is_given_back_as_answer():
    text = "<|channel|>" + "word " * 80  # no <|message|>: not a header after all
    reasoning, answer, _ = streamed(list(text))
    assert reasoning == "" and "word word" in answer


def test_a_prompt_that_opened_the_final_body_streams_answer_from_the_first_token():
    prompt = "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>"
    header = prompt_header(prompt)
    assert header == "assistant<|channel|>final<|message|>"
    stream = HarmonyStream(header=header)
    assert stream.feed("Hi").answer == "Hi" and stream.feed("!").answer == "!"
    assert ReplyReasoning.of(HARMONY_TEMPLATE, prompt).split("Hi!<|return|>").answer == "Hi!"


def test_prompt_header_is_what_the_prompt_left_open():
    assert prompt_header("<|start|>user<|message|>hi<|end|><|start|>assistant") == "assistant"
    assert prompt_header("<|start|>user<|message|>hi<|end|>") is None
    assert prompt_header("no markers") is None


def test_a_function_call_on_the_commentary_channel_becomes_a_tool_call():
    plan = plan_tools([WEATHER_TOOL], "auto", parallel=False, template=HARMONY_TEMPLATE)
    split = split_harmony(CALL_REPLY)
    assert split.reasoning == "Need the weather tool."
    content, calls = plan.parse(split.answer)
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_a_function_call_streamed_and_ended_by_its_stop_token_is_read_whole():
    plan = plan_tools([WEATHER_TOOL], "auto", parallel=False, template=HARMONY_TEMPLATE)
    ended = CALL_REPLY[: -len("<|call|>")]  # <|call|> is a stop token: the engine never shows it
    stream, tools = HarmonyStream(), plan.stream()
    shown = ""
    for ch in ended:
        shown += tools.feed(stream.feed(ch).answer)
    shown += tools.feed(stream.flush().answer)
    content, calls = tools.finish()
    assert shown == "" and content == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_a_function_call_cut_by_max_tokens_is_reported_as_far_as_it_got():
    plan = plan_tools([WEATHER_TOOL], "auto", parallel=False, template=HARMONY_TEMPLATE)
    cut = CALL_REPLY[: CALL_REPLY.index("Paris") + 3]
    content, calls = plan.parse(split_harmony(cut).answer, cut=True)
    assert content is None and [c.name for c in calls] == ["get_weather"]
    assert not calls[0].complete


def test_harmony_is_told_from_the_template():
    assert template_is_harmony(HARMONY_TEMPLATE) and template_reasons(HARMONY_TEMPLATE)
    assert not template_is_harmony("{{ '<think>' }}") and not template_is_harmony(None)
    prompt = "<|start|>user<|message|>hi<|end|><|start|>assistant"
    plan = ReplyReasoning.of(HARMONY_TEMPLATE, prompt, SamplingParams())
    assert plan.reasons and plan.harmony and plan.header == "assistant"
    assert isinstance(plan.stream(), HarmonyStream)
    assert plan.split(REPLY).reasoning == THOUGHTS
    think = ReplyReasoning.of("<think>", "<think>", SamplingParams())
    assert not think.harmony and not isinstance(think.stream(), HarmonyStream)


def test_the_engine_shows_a_marker_only_where_the_vocabulary_holds_it_as_one_control_token(starter_gguf):
    """gpt-oss's markers are control tokens, which llama.cpp leaves out of the text by default; the engine
    shows those a vocabulary holds as one token. Checked on the starter's own control token and a marker
    that is ordinary text in its vocabulary."""
    import llama_cpp
    from llama_cpp import _internals

    from localllm.engine_kit.llama_glue import single_tokens, token_piece

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=str(starter_gguf), params=params, verbose=False)
    try:
        ids = single_tokens(model, ("<start_of_turn>", "<|channel|>"))
        assert len(ids) == 1  # <|channel|> is several ordinary tokens here
        (control,) = ids
        assert token_piece(llama_cpp, model.vocab, control) == b""
        assert token_piece(llama_cpp, model.vocab, control, special=True) == b"<start_of_turn>"
    finally:
        model.close()


# -- through a live server -----------------------------------------------------------------------

MODEL = "harmony-starter"
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("harmony-home")
    files = tmp_path_factory.mktemp("harmony-files")
    model = copy_with_string_key(starter_gguf, files / "harmony.gguf", "tokenizer.chat_template", HARMONY_TEMPLATE)
    make_store(home, {MODEL: model})
    srv = start_server(home, MODEL, "--ctx", "512", "--threads", "2")
    for running in served(srv):
        yield running


def test_the_openai_sdk_gets_a_harmony_models_reply_with_reasoning_content_apart(server):
    client = openai.OpenAI(base_url=server.v1, api_key="x", timeout=120)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    message = reply.choices[0].message
    # read as a reasoning model: the field is there (the starter writes no analysis, so it is empty)
    assert "reasoning_content" in (message.model_extra or {})
    assert message.content and "<|" not in message.content
    assert reply.usage.prompt_tokens > 30  # the template's system message was rendered into the prompt


def test_the_ollama_sdk_may_ask_a_harmony_model_to_think(server):
    client = ollama.Client(host=server.url, timeout=120)
    reply = client.chat(model=MODEL, messages=MESSAGES, options={"temperature": 0, "num_predict": 12}, think=True)
    assert reply.message.content and "<|" not in reply.message.content
    assert reply.prompt_eval_count > 30
    shown = client.show(MODEL)
    assert "thinking" in (shown.capabilities or [])


def test_a_template_that_reads_reasoning_effort_gets_the_requests_effort():
    from localllm.server.thinking import template_vars_for

    harmony_like = "{{ '<|start|>system<|message|>Reasoning: ' + (reasoning_effort or 'medium') + '<|end|>' }}<|channel|>"
    assert template_vars_for(harmony_like, True, "gpt-oss:20b", True, "reasoning_effort", effort="high") == {
        "reasoning_effort": "high"
    }
    assert template_vars_for(harmony_like, None, "gpt-oss:20b", True, "reasoning_effort") == {}
    assert template_vars_for(harmony_like, False, "gpt-oss:20b", True, "reasoning_effort", effort="none") == {}
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert template_vars_for(plain, None, "other", None, "reasoning_effort", effort="high") == {}
