"""The reasoning splitter: thoughts and answer apart, as tokens arrive, with no piece of a tag leaking."""

from __future__ import annotations

import io

import pytest

from localllm.cli.console import DIM, RESET, ThoughtsFirst
from localllm.core.errors import BadRequest
from localllm.core.reasoning import (
    ReasoningStream,
    ReplyReasoning,
    prompt_opens_thoughts,
    split_reply,
    template_reasons,
    thinking_switch,
)


def run(pieces: list[str], *, inside: bool = False) -> tuple[list[str], list[str]]:
    """Feed pieces one by one; return what was shown of each kind, per step (flush last)."""
    stream = ReasoningStream(inside=inside)
    reasoning, answer = [], []
    for piece in pieces:
        out = stream.feed(piece)
        reasoning.append(out.reasoning)
        answer.append(out.answer)
    out = stream.flush()
    reasoning.append(out.reasoning)
    answer.append(out.answer)
    return reasoning, answer


def every_split(text: str) -> list[list[str]]:
    """The text cut into one-character tokens, and into tokens of two and three characters."""
    return [[text[i : i + n] for i in range(0, len(text), n)] for n in (1, 2, 3)]


REPLY = "<think>\nThe user greets me.\n</think>\n\nHello there!"


@pytest.mark.parametrize("pieces", every_split(REPLY))
def test_tags_split_across_tokens_never_leak(pieces: list[str]) -> None:
    reasoning, answer = run(pieces)
    assert "".join(reasoning) == "The user greets me."
    assert "".join(answer) == "Hello there!"
    for shown in reasoning + answer:  # no step ever showed a piece of a tag
        assert "<" not in shown and ">" not in shown


def test_thoughts_stream_before_they_close() -> None:
    reasoning, answer = run(["<think>", "I am", " thinking", " hard", "</th", "ink>", "Yes"])
    assert reasoning[2] == " thinking" and reasoning[3] == " hard"
    assert reasoning[4] == "" and answer[4] == ""  # "</th" could still be the closing tag
    assert "".join(answer) == "Yes"


def test_opening_tag_in_the_prompt() -> None:
    prompt = "<|im_start|>assistant\n<think>\n"
    assert prompt_opens_thoughts(prompt)
    assert not prompt_opens_thoughts("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    reasoning, answer = run(["Let me see", ".\n</", "think>\n\n", "Four."], inside=True)
    assert "".join(reasoning) == "Let me see."
    assert "".join(answer) == "Four."


def test_a_tag_the_prompt_opened_and_the_model_repeats_is_dropped() -> None:
    reasoning, answer = run(["<th", "ink>\nSo", " be it.</think>", "Yes."], inside=True)
    assert ("".join(reasoning), "".join(answer)) == ("So be it.", "Yes.")
    assert split_reply("  <th", inside=True).reasoning == "<th"  # cut before it could be a tag: a thought


def test_no_tag_at_all_is_all_answer() -> None:
    reasoning, answer = run(["Hello", ", world", " <think> is just text"])
    assert "".join(reasoning) == ""
    assert "".join(answer) == "Hello, world <think> is just text"
    assert answer[0] == "Hello"  # shown at once: it cannot become a tag
    assert split_reply("  <thi").answer == "  <thi"  # a reply that ends looking like a tag is still text


def test_unclosed_thoughts_at_length_stay_reasoning() -> None:
    reasoning, answer = run(["Step one", ", step two </thi"], inside=True)
    assert "".join(reasoning) == "Step one, step two </thi"
    assert "".join(answer) == ""


def test_a_later_opening_tag_is_answer_text() -> None:
    split = split_reply("<think>a</think>b <think>c</think>")
    assert (split.reasoning, split.answer) == ("a", "b <think>c</think>")


def test_templates_that_reason() -> None:
    assert template_reasons("{{ '<think>\\n' }}")
    assert template_reasons("{% if enable_thinking is false %}x{% endif %}")
    assert not template_reasons("{{ messages }}") and not template_reasons(None)
    plan = ReplyReasoning.of("<think>", "prompt<think>\n")
    assert plan.inside and plan.stream() is not None
    assert ReplyReasoning.of(None, "x<think>\n").stream() is None
    assert ReplyReasoning.of(None, "x").split("<think>a</think>b").answer == "<think>a</think>b"


def test_thinking_switch() -> None:
    qwen = "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}"
    assert thinking_switch(qwen, False, "m") == {"enable_thinking": False}
    assert thinking_switch(qwen, None, "m") == {}
    assert thinking_switch("<think>", True, "m") == {}  # reasons always; nothing to switch
    with pytest.raises(BadRequest, match="model 'm' does not support thinking"):
        thinking_switch("{{ messages }}", True, "m")
    assert thinking_switch("{{ messages }}", False, "m") == {}


def test_the_catalogs_reasoning_flag_is_the_default_for_think() -> None:
    qwen = "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}"
    assert thinking_switch(qwen, None, "m", reasons=True) == {"enable_thinking": True}
    assert thinking_switch(qwen, False, "m", reasons=True) == {"enable_thinking": False}  # the request wins
    assert thinking_switch(qwen, None, "m", reasons=False) == {}  # not marked: the template's own default
    assert thinking_switch(qwen, None, "m", reasons=None) == {}
    # gpt-oss reasons in its own channels, with no <think> in its template: asking it to think is no error
    harmony = "<|start|>assistant<|channel|>analysis<|message|>"
    assert thinking_switch(harmony, True, "gpt-oss:20b", reasons=True) == {}
    assert thinking_switch(harmony, True, "m", reasons=None) == {}  # its analysis channel is its thoughts (core/harmony.py)
    with pytest.raises(BadRequest, match="does not support thinking"):
        thinking_switch("{{ messages }}", True, "m", reasons=None)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_line_chat_writes_thoughts_dimmed_on_a_terminal_and_plain_elsewhere(terminal: bool) -> None:
    out = _Terminal() if terminal else io.StringIO()
    writer = ThoughtsFirst(ReasoningStream(inside=True), out)
    for piece in ["Hmm", ", two.", "\n</th", "ink>\n\nT", "wo."]:
        writer(piece)
    writer.finish()
    if terminal:
        assert out.getvalue() == f"{DIM}Hmm{RESET}{DIM}, two.{RESET}\n\nTwo."
    else:
        assert out.getvalue() == "Hmm, two.\n\nTwo."
    assert "".join(writer.answer) == "Two."  # only the answer goes back into the conversation


def test_a_grammar_from_the_first_token_leaves_no_room_for_thoughts() -> None:
    from localllm.core.requests import SamplingParams

    prompt = "x<think>\n"
    assert not ReplyReasoning.of("<think>", prompt, SamplingParams(grammar='root ::= "{}"')).inside
    lazy = SamplingParams(grammar='root ::= "{}"', grammar_triggers=["<tool_call>"])  # free text until a call opens
    assert ReplyReasoning.of("<think>", prompt, lazy).inside
