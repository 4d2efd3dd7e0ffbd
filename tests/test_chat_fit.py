"""Fitting long chats into the context (chat_fit.py), with the real starter tokenizer and template, and in the line chat."""

from __future__ import annotations

import io
import re

import pytest

from localllm.core.requests import SamplingParams
from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions
from localllm.backends.chat_fit import ChatTooLong, FittedChat, count_prompt_tokens, fit_chat, reply_reserve
from localllm.cli.linechat import line_chat
from localllm.core.modelinfo import read_model_info
from test_tui_real_chat import CTX, NOTE, NOTICE, RecordingLlamaCpp

SYSTEM = {"role": "system", "content": "You are Quill, a gardener's notebook."}


@pytest.fixture(scope="module")
def backend(starter_gguf):
    opened = RecordingLlamaCpp("starter", read_model_info(starter_gguf), LlamaCppOptions(n_ctx=CTX, n_threads=1))
    yield opened
    opened.close()


def long_chat(turns: int) -> list[dict]:
    chat = [SYSTEM]
    for i in range(turns):
        chat += [{"role": "user", "content": f"Note {i}. " + NOTE * 2}, {"role": "assistant", "content": f"Noted {i}."}]
    return chat + [{"role": "user", "content": "What did I tell you?"}]


def test_the_notice_reads_as_promised():
    fitted = FittedChat([], "", 100, 4096, dropped_messages=3, dropped_tokens=1210)
    assert fitted.notice == "3 earlier messages, 1,210 tokens, no longer fit in the 4,096-token context"
    assert FittedChat([], "", 100, 512, 1, 40).notice == "1 earlier message, 40 tokens, no longer fits in the 512-token context"
    assert FittedChat([], "", 100, 512).notice is None


def test_a_short_chat_is_sent_whole(backend):
    chat = long_chat(1)
    fitted = fit_chat(backend, chat, max_tokens=16)
    assert fitted.messages == chat and fitted.notice is None
    assert fitted.prompt == backend.render_chat(chat)
    assert fitted.prompt_tokens == len(backend.tokenize(fitted.prompt, add_bos=False, special=True))  # the template writes <bos>


def test_the_oldest_turns_go_and_the_count_is_the_tokenizers(backend):
    chat = long_chat(10)
    whole = count_prompt_tokens(backend, backend.render_chat(chat))
    assert whole > 3 * CTX
    fitted = fit_chat(backend, chat, max_tokens=16)
    assert fitted.messages[0] == SYSTEM and fitted.messages[-1] == chat[-1]
    assert fitted.messages[1]["role"] == "user"  # whole exchanges go
    assert fitted.messages == [SYSTEM] + chat[len(chat) - len(fitted.messages) + 1 :]
    assert fitted.prompt_tokens + 16 <= CTX
    # the fewest dropped: one more exchange would not have fit
    one_more = [SYSTEM] + chat[len(chat) - len(fitted.messages) - 1 :]
    assert count_prompt_tokens(backend, backend.render_chat(one_more)) + 16 > CTX
    assert fitted.dropped_messages == len(chat) - len(fitted.messages)
    assert fitted.dropped_tokens == whole - fitted.prompt_tokens
    assert NOTICE.match(fitted.notice)


def test_room_for_the_reply_is_at_most_a_quarter_of_the_context():
    assert reply_reserve(4096, 512) == 512
    assert reply_reserve(512, 512) == 128
    assert reply_reserve(512, None) == 128


def test_the_last_message_alone_is_kept_even_without_full_room_for_the_reply(backend):
    big = {"role": "user", "content": "Remember: " + NOTE * 5}  # ~180 tokens: fits, but not with 64 to spare
    fitted = fit_chat(backend, long_chat(2)[:-1] + [big], max_tokens=None)
    assert fitted.messages == [SYSTEM, big]


def test_a_message_larger_than_the_context_is_an_error(backend):
    with pytest.raises(ChatTooLong, match=rf"the system prompt and this message take [\d,]+ tokens, more than the whole {CTX}-token context"):
        fit_chat(backend, [SYSTEM, {"role": "user", "content": NOTE * 12}])
    with pytest.raises(ChatTooLong, match="this message takes"):
        fit_chat(backend, [{"role": "user", "content": NOTE * 12}])


def test_the_line_chat_keeps_answering_and_says_what_it_dropped(backend, monkeypatch, capsys):
    lines = [f"Note {i}. " + NOTE * 4 for i in range(6)] + ["Tell me everything. " + NOTE * 12, "Thanks", "/bye"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    backend.requests.clear()
    assert line_chat(backend, SamplingParams(temperature=0.0, max_tokens=6), system=SYSTEM["content"]) == 0
    err = capsys.readouterr().err
    notices = re.findall(r"^\((.*)\)$", err, re.MULTILINE)
    assert notices and all(NOTICE.match(n) for n in notices), err
    assert re.search(rf"^error: the system prompt and this message take [\d,]+ tokens, more than the whole {CTX}-token", err, re.MULTILINE)
    sent = backend.requests
    assert len(sent) == 7  # six notes and the thanks: the oversized message was refused, the chat went on
    assert all(r.messages[0] == SYSTEM and r.messages[1]["role"] == "user" for r in sent)
    assert [r.messages[-1]["content"][:7] for r in sent] == [f"Note {i}." for i in range(6)] + ["Thanks"]
    assert "Tell me everything" not in sent[-1].prompt
