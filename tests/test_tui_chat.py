"""The chat app, driven with Textual's Pilot against a deterministic backend."""

from __future__ import annotations

import asyncio

import pytest

from localllm.tui.app import LocalLLMApp
from localllm.tui.screens.chat import ChatScreen
from localllm.tui.widgets.message_view import MessageView
from localllm.tui.widgets.prompt_input import PromptInput
from tui_fakes import REPLY, FakeFactory, wait_until

SIZE = (100, 30)


def make_app(tmp_path, **kw) -> tuple[LocalLLMApp, FakeFactory]:
    factory = FakeFactory(**kw)
    return LocalLLMApp("starter", factory=factory, home=tmp_path), factory


async def send(pilot, text: str) -> None:
    await pilot.click(PromptInput)
    for ch in text:
        await pilot.press("space" if ch == " " else ch)
    await pilot.press("enter")


def views(app) -> list[MessageView]:
    return list(app.screen.query(MessageView))


def test_a_message_gets_a_streamed_reply_with_stats(tmp_path):
    async def run():
        app, factory = make_app(tmp_path, delay_s=0.01)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            assert isinstance(app.screen, ChatScreen)
            assert app.focused is app.screen.query_one(PromptInput), "typed keys must reach the message box"
            await send(pilot, "hi there")
            await wait_until(pilot, lambda: len(views(app)) == 2 and app.screen.request_id is None)
            user, reply = views(app)
            assert user.message.content == "hi there"
            assert reply.message.content == REPLY
            stats = str(reply.query_one(".stats").render())
            assert "TTFT 125 ms" in stats and "tok/s" in stats and "tokens" in stats
            assert factory.opened[0].prompts[-1].startswith("<user>hi there")

    asyncio.run(run())


def test_escape_stops_a_reply_and_keeps_the_partial_text(tmp_path):
    async def run():
        app, factory = make_app(tmp_path, delay_s=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await send(pilot, "go")
            await wait_until(pilot, lambda: len(views(app)) == 2 and views(app)[1].message.content == "" and app.screen.request_id)
            await wait_until(pilot, lambda: factory.opened[0].tokens_sent > 0)  # the reply is streaming
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.screen.request_id is None)
            reply = views(app)[1]
            assert reply.message.stopped
            assert 0 < len(reply.message.content) < len(REPLY)
            assert "stopped" in str(reply.query_one(".stats").render())
            saved = app.conversations.messages(app.screen.conversation.id)
            assert saved[-1].stopped and saved[-1].content == reply.message.content

    asyncio.run(run())


def test_typing_works_while_a_reply_streams(tmp_path):
    async def run():
        app, _ = make_app(tmp_path, delay_s=0.3)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await send(pilot, "first")
            await wait_until(pilot, lambda: app.screen.request_id is not None)
            for ch in "next":
                await pilot.press(ch)
            assert app.screen.request_id is not None, "still streaming"
            assert app.screen.query_one(PromptInput).text == "next"

    asyncio.run(run())


def test_new_chat_regenerate_and_edit(tmp_path):
    async def run():
        app, factory = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await send(pilot, "one")
            await wait_until(pilot, lambda: len(views(app)) == 2 and app.screen.request_id is None)
            await pilot.press("ctrl+r")
            await wait_until(pilot, lambda: len(factory.opened[0].prompts) == 2 and app.screen.request_id is None)
            assert len(views(app)) == 2
            assert len(app.conversations.messages(app.screen.conversation.id)) == 2
            await pilot.press("ctrl+e")
            assert app.screen.query_one(PromptInput).text == "one" and views(app) == []
            await pilot.press("enter")
            await wait_until(pilot, lambda: len(views(app)) == 2 and app.screen.request_id is None)
            first_id = app.screen.conversation.id
            await pilot.press("ctrl+n")
            assert views(app) == [] and app.screen.conversation is None
            await send(pilot, "two")
            await wait_until(pilot, lambda: len(views(app)) == 2 and app.screen.request_id is None)
            assert app.screen.conversation.id != first_id
            assert [c.title for c in app.conversations.list()] == ["two", "one"]

    asyncio.run(run())


def test_conversation_and_settings_survive_a_restart(tmp_path):
    async def first():
        app, _ = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await send(pilot, "remember me")
            await wait_until(pilot, lambda: len(views(app)) == 2 and app.screen.request_id is None)
            conversation = app.screen.conversation
            conversation.settings.sampling.temperature = 0.2
            conversation.settings.system = "be brief"
            app.conversations.update(conversation)

    async def second():
        app, factory = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            items = app.screen.query("ConversationItem")
            assert [i.conversation.title for i in items] == ["remember me"]
            await wait_until(pilot, lambda: items.first().region.width > 0)  # laid out: clickable
            await pilot.click("ConversationItem")
            await wait_until(pilot, lambda: len(views(app)) == 2)
            assert views(app)[1].message.content == REPLY
            assert app.screen.settings.sampling.temperature == 0.2 and app.screen.settings.system == "be brief"
            await send(pilot, "again")
            await wait_until(pilot, lambda: len(views(app)) == 4 and app.screen.request_id is None)
            assert factory.opened[-1].prompts[-1].startswith("<system>be brief<user>remember me")

    asyncio.run(first())
    asyncio.run(second())


def test_search_rename_and_delete_conversations(tmp_path):
    async def run():
        app, _ = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            for text in ("apples", "bananas"):
                await pilot.press("ctrl+n")
                await send(pilot, text)
                await wait_until(pilot, lambda: app.screen.request_id is None and len(views(app)) == 2)
            await pilot.press("ctrl+f")
            for ch in "banan":
                await pilot.press(ch)
            titles = [i.conversation.title for i in app.screen.query("ConversationItem")]
            assert titles == ["bananas"]
            await pilot.press("f6")
            await pilot.press(*["backspace"] * 10, "y", "e", "l", "l", "o", "w", "enter")
            assert app.conversations.get(app.screen.conversation.id).title == "yellow"
            await pilot.press("f8")
            await pilot.press("y")
            await wait_until(pilot, lambda: [c.title for c in app.conversations.list()] == ["apples"])

    asyncio.run(run())


def test_a_model_that_fails_to_load_is_a_notification_not_a_crash(tmp_path):
    async def run():
        factory = FakeFactory(broken=("starter",))
        app = LocalLLMApp("starter", factory=factory, home=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app._load_failure is not None)
            await send(pilot, "hello")
            await wait_until(pilot, lambda: app.screen.request_id is None and len(views(app)) == 2)
            notes = [n.message for n in app._notifications]
            assert any("not enough memory" in n for n in notes)

    asyncio.run(run())


def test_ctrl_q_quits_quickly_mid_reply(tmp_path):
    async def run():
        app, factory = make_app(tmp_path, delay_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await send(pilot, "long")
            await wait_until(pilot, lambda: factory.opened[0].tokens_sent > 0)  # mid reply
            loop = asyncio.get_running_loop()
            started = loop.time()
            await pilot.press("ctrl+q")
        assert loop.time() - started < 1.0
        assert factory.opened[0].closed

    asyncio.run(run())


def test_a_reply_with_thoughts_shows_them_collapsed_above_the_answer(tmp_path):
    from types import SimpleNamespace

    from textual.widgets import Collapsible, Static

    from tui_fakes import FakeBackend

    thinking = "<think>\nThe user says hi; greet back.\n</think>\n\nHello!"

    class ThinkingFactory(FakeFactory):
        def make(self, name: str) -> FakeBackend:  # a reasoning template, and a reply that reasons
            return FakeBackend(name, reply=thinking, delay_s=self.delay_s, info=SimpleNamespace(chat_template="{{ '<think>' }}"))

    async def run():
        app = LocalLLMApp("starter", factory=ThinkingFactory(delay_s=0.01), home=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await send(pilot, "hi")
            await wait_until(pilot, lambda: len(views(app)) == 2 and app.screen.request_id is None)
            reply = views(app)[1]
            assert reply.message.content == "Hello!"  # no tag, no thought in the answer
            thoughts = reply.query_one(".thoughts", Collapsible)
            assert thoughts.display and thoughts.collapsed
            assert str(thoughts.query_one(".thoughts-text", Static).render()) == "The user says hi; greet back."
            assert thoughts.region.y < reply.body.region.y  # above the answer
            user_thoughts = views(app)[0].query(".thoughts")
            assert not user_thoughts  # a user's message has none
            saved = app.conversations.messages(app.screen.conversation.id)[-1]
            assert (saved.content, saved.reasoning) == ("Hello!", "The user says hi; greet back.")

    asyncio.run(run())


def test_a_reply_without_thoughts_has_no_visible_thoughts_block(tmp_path):
    async def run():
        app, _ = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await send(pilot, "hi")
            await wait_until(pilot, lambda: len(views(app)) == 2 and app.screen.request_id is None)
            assert not views(app)[1].query_one(".thoughts").display

    asyncio.run(run())


def test_a_conversation_file_from_before_thoughts_were_kept_opens_and_keeps_them(tmp_path):
    import sqlite3

    from localllm.tui.conversations import ConversationStore, Message

    path = tmp_path / "conversations.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL, model TEXT NOT NULL,"
        " settings TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);"
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL, role TEXT NOT NULL,"
        " content TEXT NOT NULL, stats TEXT, stopped INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO conversations VALUES (1, 'old', 'starter', '{}', 0, 0);"
        "INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', 'hi');"
    )
    old.commit()
    old.close()
    store = ConversationStore(path)
    assert [(m.content, m.reasoning) for m in store.messages(1)] == [("hi", "")]
    store.add_message(1, Message("assistant", "Hello!", reasoning="greet back"))
    assert store.messages(1)[-1].reasoning == "greet back"
    store.close()
