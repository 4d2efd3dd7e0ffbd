"""The chat app on the real starter model through llama.cpp (Pilot): sampling flags, long chats, the meter."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import pytest

from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions
from localllm.core.modelinfo import read_model_info
from localllm.core.requests import SamplingParams
from localllm.store.store import ResolvedModel
from localllm.tui.app import LocalLLMApp
from localllm.tui.conversations import ChatSettings
from localllm.tui.screens.settings import SettingsScreen
from localllm.tui.widgets.message_view import MessageView
from localllm.tui.widgets.prompt_input import PromptInput
from tui_fakes import wait_until

SIZE = (100, 30)
CTX = 256  # small, so a long chat costs little prompt processing
NOTICE = re.compile(rf"^\d+ earlier messages?, [\d,]+ tokens, no longer fits? in the {CTX}-token context$")
NOTE = ("Here is a note about the garden: the roses by the fence need water every morning, the tomatoes "
        "want a stake, and the old apple tree drops its fruit in September. ")


class RecordingLlamaCpp(LlamaCppBackend):
    """The real llama.cpp backend, keeping each request it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests = []

    async def generate(self, req):
        self.requests.append(req)
        async for event in super().generate(req):
            yield event


class StarterFactory:
    def __init__(self, path, n_ctx: int = CTX) -> None:
        self.path, self.n_ctx, self.opened = path, n_ctx, []

    def resolve(self, name: str) -> ResolvedModel:
        return ResolvedModel(name, self.path)

    def open(self, model: ResolvedModel, n_ctx: int | None) -> RecordingLlamaCpp:
        backend = RecordingLlamaCpp(model.name, read_model_info(self.path), LlamaCppOptions(n_ctx=n_ctx or self.n_ctx, n_threads=1))
        self.opened.append(backend)
        return backend


def views(app) -> list[MessageView]:
    return list(app.screen.query(MessageView))


def replies(app) -> list[str]:
    return [v.message.content for v in views(app) if v.message.role == "assistant"]


def notices(app) -> list[str]:
    return [str(n.render()) for n in app.screen.query(".notice")]


async def reply_to(pilot, text: str) -> str:
    """Send `text` (as the message box would) and wait for the whole reply."""
    app = pilot.app
    count = len(replies(app))
    app.screen.send(text)
    await wait_until(pilot, lambda: app.screen.request_id is None and len(replies(app)) == count + 1, timeout=120)
    return replies(app)[-1]


async def regenerate(pilot) -> str:
    app = pilot.app
    app.screen.action_regenerate()
    await wait_until(pilot, lambda: app.screen.request_id is None and views(app)[-1].message.stats is not None, timeout=120)
    return replies(app)[-1]


def run_app(starter_gguf, defaults: ChatSettings, body, tmp_path) -> StarterFactory:
    factory = StarterFactory(starter_gguf)

    async def run():
        app = LocalLLMApp("starter", factory=factory, home=tmp_path, defaults=defaults)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None, timeout=120)
            await body(pilot)

    asyncio.run(run())
    return factory


def test_seeded_replies_repeat_and_the_seed_is_applied(starter_gguf, tmp_path):
    defaults = ChatSettings(sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, max_tokens=12))

    async def body(pilot):
        first = await reply_to(pilot, "Write a poem about the sea")
        assert first and await regenerate(pilot) == first
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
        seed = pilot.app.screen.query_one("#seed")
        assert seed.value == "7"
        seed.value = "8"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(pilot.app.screen, SettingsScreen))
        assert pilot.app.screen.settings.sampling.seed == 8
        assert await regenerate(pilot) != first  # the seed reached the sampler (at temperature 1 any reply differs)

    factory = run_app(starter_gguf, defaults, body, tmp_path)
    params = [r.params for r in factory.opened[0].requests]
    assert [p.seed for p in params] == [7, 7, 8] and all(p.temperature == 1.0 and p.top_k == 0 for p in params)


def test_a_stop_string_ends_the_reply_and_the_meter_moves(starter_gguf, tmp_path):
    defaults = ChatSettings(sampling=SamplingParams(temperature=0.0, max_tokens=32))
    seen: dict = {}

    async def body(pilot):
        app = pilot.app
        meter = app.screen.query_one("#context-meter")
        app.screen.send("Tell me about the moon")
        readings = []
        await wait_until(pilot, lambda: app.screen.request_id is not None)
        while app.screen.request_id is not None:
            readings.append(str(meter.render()))
            await pilot.pause(0.02)
        await wait_until(pilot, lambda: len(replies(app)) == 1 and views(app)[-1].message.stats is not None)
        seen["readings"], seen["whole"] = readings, replies(app)[0]
        seen["final_meter"] = str(meter.render())
        whole = seen["whole"]
        cut = next(i for i in range(len(whole) // 2, len(whole)) if whole[i] == " ")
        seen["stop"] = whole[cut : cut + 4]
        await pilot.press("ctrl+n")
        draft = app.screen.draft_settings
        app.screen.draft_settings = replace(draft, sampling=replace(draft.sampling, stop=[seen["stop"]]))
        seen["stopped"] = await reply_to(pilot, "Tell me about the moon")
        seen["stats"] = views(app)[-1].message.stats

    run_app(starter_gguf, defaults, body, tmp_path)
    used = [int(m.group(1).replace(",", "")) for r in seen["readings"] if (m := re.match(rf"context ([\d,]+) / {CTX}", r))]
    assert len(set(used)) >= 3, seen["readings"]  # it moved while the reply streamed
    assert used == sorted(used)
    assert re.match(rf"context [\d,]+ / {CTX}", seen["final_meter"])
    whole, stop = seen["whole"], seen["stop"]
    assert seen["stopped"] == whole[: whole.index(stop)]
    assert seen["stats"]["reason"] == "stop" and seen["stats"]["completion_tokens"] < 32


def test_a_chat_three_times_the_context_keeps_answering(starter_gguf, tmp_path):
    system = "You are Quill, a gardener's notebook."
    defaults = ChatSettings(system=system, sampling=SamplingParams(temperature=0.0, max_tokens=8))
    turns = 6

    async def body(pilot):
        app = pilot.app
        assert turns * len(app.session.backend.tokenize(NOTE * 4)) > 3 * CTX
        for i in range(turns):
            assert await reply_to(pilot, f"Note {i}. " + NOTE * 4), f"turn {i} got no reply"
        shown = notices(app)
        assert shown and all(NOTICE.match(n) for n in shown), shown
        assert f"/ {CTX}" in str(app.screen.query_one("#context-meter").render())
        assert len(app.conversations.messages(app.screen.conversation.id)) == 2 * turns  # nothing is lost from the chat

    factory = run_app(starter_gguf, defaults, body, tmp_path)
    sent = factory.opened[0].requests
    assert len(sent) == turns and all(r.messages[0] == {"role": "system", "content": system} for r in sent)
    assert all(r.messages[-1]["content"].startswith(f"Note {i}. ") for i, r in enumerate(sent))
    assert len(sent[-1].messages) < 2 * turns  # the oldest turns went
    assert all(r.messages[1]["role"] == "user" for r in sent)


def test_a_message_larger_than_the_context_is_an_error_and_comes_back(starter_gguf, tmp_path):
    huge = "Tell me everything. " + NOTE * 20

    async def body(pilot):
        app = pilot.app
        app.screen.send(huge)
        await wait_until(pilot, lambda: app.screen.request_id is None and any("error" in n for n in notices(app)))
        (error,) = notices(app)
        assert re.match(rf"error: this message takes [\d,]+ tokens, more than the whole {CTX}-token context", error)
        assert views(app) == [] and app.screen.query_one(PromptInput).text == huge
        assert app.conversations.messages(app.screen.conversation.id) == []
        assert await reply_to(pilot, "Hello")  # the chat goes on

    run_app(starter_gguf, ChatSettings(sampling=SamplingParams(temperature=0.0, max_tokens=4)), body, tmp_path)
