"""Every sampling flag of `localllm chat` reaches the full-screen app, its settings screen and its requests;
the hardware screen explains the backend from the fit plan."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from localllm.cli.commands import chat_defaults
from localllm.cli.loading import load_options, sampling_from
from localllm.cli.parser import parse_command_line
from localllm.fit.planner import Wishes, plan_fit
from localllm.fit.render import verdict
from localllm.core.modelinfo import read_model_info
from localllm.tui.app import LocalLLMApp
from localllm.tui.conversations import ChatSettings, ConversationStore
from localllm.tui.screens.settings import SettingsScreen, format_stops, parse_stops
from tui_fakes import FakeBackend, FakeFactory, FixedHardwareProbe, wait_until

SIZE = (100, 30)
FLAGS = ["--temperature", "0.5", "--top-p", "0.9", "--top-k", "20", "--min-p", "0.1", "--repeat-penalty", "1.3",
         "--seed", "5", "--stop", "X", "--stop", "\n\n", "--max-tokens", "64"]


async def open_settings(pilot) -> SettingsScreen:
    await pilot.press("ctrl+s")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
    return pilot.app.screen


def shown(screen: SettingsScreen) -> dict[str, str]:
    return {f: screen.query_one(f"#{f}").value for f in
            ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop", "max_tokens")}


def test_every_chat_flag_reaches_the_settings_screen_and_the_engine(tmp_path):
    args = parse_command_line(["chat", *FLAGS[:6], "starter", *FLAGS[6:]])
    defaults = chat_defaults(args, sampling_from(args))
    factory = FakeFactory()

    async def run():
        app = LocalLLMApp("starter", factory=factory, home=tmp_path, defaults=defaults)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            screen = await open_settings(pilot)
            assert shown(screen) == {"temperature": "0.5", "top_p": "0.9", "top_k": "20", "min_p": "0.1",
                                     "repeat_penalty": "1.3", "seed": "5", "stop": "X,\\n\\n", "max_tokens": "64"}
            await pilot.press("escape")
            app.screen.send("first")
            await wait_until(pilot, lambda: app.screen.request_id is None and len(factory.opened[0].requests) == 1)
            screen = await open_settings(pilot)
            screen.query_one("#top_k").value = "30"
            screen.query_one("#stop").value = "END,\\,"
            screen.query_one("#seed").value = ""
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
            app.screen.send("second")
            await wait_until(pilot, lambda: app.screen.request_id is None and len(factory.opened[0].requests) == 2)
            saved = app.conversations.get(app.screen.conversation.id).settings.sampling
            assert (saved.top_k, saved.stop, saved.seed) == (30, ["END", ","], None)  # per conversation, kept

    asyncio.run(run())
    first, second = (r.params for r in factory.opened[0].requests)
    assert (first.temperature, first.top_p, first.top_k, first.min_p, first.repeat_penalty, first.seed, first.stop,
            first.max_tokens) == (0.5, 0.9, 20, 0.1, 1.3, 5, ["X", "\n\n"], 64)
    assert replace(second, top_k=20, stop=["X", "\n\n"], seed=5) == first


def test_a_bad_value_is_named_and_nothing_is_saved(tmp_path):
    async def run():
        app = LocalLLMApp("starter", factory=FakeFactory(), home=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_settings(pilot)
            screen.query_one("#min_p").value = "2"
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, SettingsScreen)
            assert "Min-p must be between 0.0 and 1.0" in str(screen.query_one("#problem").render())

    asyncio.run(run())


@pytest.mark.parametrize("stops", [[], ["X"], ["\n\n", "a,b", "back\\slash", "\tTab"], ["User:"]])
def test_stop_strings_survive_one_line(stops):
    assert parse_stops(format_stops(stops)) == stops
    assert "\n" not in format_stops(stops)


def probe_with(gpus: bool, cuda_build: bool) -> FixedHardwareProbe:
    probe = FixedHardwareProbe()
    facts = probe.facts
    probe.facts = replace(facts, gpus=facts.gpus if gpus else [], llama_cpp=replace(facts.llama_cpp, cuda=cuda_build))
    return probe


@pytest.mark.parametrize("gpus, cuda_build", [(True, True), (True, False), (False, False)],
                         ids=["cuda-build", "cpu-build", "no-gpu"])
def test_the_backend_explanation_is_the_fit_plan(starter_gguf, tmp_path, gpus, cuda_build):
    info = read_model_info(starter_gguf)
    probe = probe_with(gpus, cuda_build)

    class Factory(FakeFactory):
        def make(self, name: str) -> FakeBackend:
            backend = FakeBackend(name, name="llamacpp", info=info)
            backend.n_ctx = 4096
            return backend

    async def run() -> str:
        app = LocalLLMApp("starter", factory=Factory(), home=tmp_path, hardware_probe=probe)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await pilot.press("f4")
            await wait_until(pilot, lambda: "Backend: llamacpp" in str(app.screen.query_one("#backend").render()))
            return str(app.screen.query_one("#backend").render())

    text = asyncio.run(run())
    plan = plan_fit(info, probe.facts, Wishes(4096))
    assert plan.backend == "llamacpp" and verdict(plan) in text
    assert plan.reasons[0] in text and plan.reasons[1] in text
    if cuda_build:
        assert plan.n_gpu_layers == info.n_layers + 1 and f"all {plan.n_gpu_layers} layers on the GPU" in text
    else:
        assert plan.n_gpu_layers == 0 and "on the CPU" in text
        assert ("CPU build" in text) == gpus  # why the GPU goes unused


def test_a_chat_saved_with_flat_settings_opens_with_the_same_settings(tmp_path):
    """Conversations saved before the settings carried SamplingParams keep every value."""
    store = ConversationStore(tmp_path / "conversations.sqlite3")
    flat = {"system": "be brief", "temperature": 0.3, "top_p": 0.8, "top_k": 7, "min_p": 0.2, "repeat_penalty": 1.1,
            "seed": 9, "stop": ["END"], "max_tokens": None, "context": 1024}
    with store.db:
        store.db.execute("INSERT INTO conversations (title, model, settings, created, updated) VALUES ('t', 'starter', ?, 0, 0)",
                         (json.dumps(flat),))
    settings = store.list()[0].settings
    assert (settings.system, settings.n_ctx) == ("be brief", 1024)
    s = settings.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty, s.seed, s.stop, s.max_tokens) == (
        0.3, 0.8, 7, 0.2, 1.1, 9, ["END"], None)
    assert ChatSettings.from_json(settings.to_json()) == settings
    store.close()


def test_chat_run_serve_and_bench_open_models_with_the_same_options():
    load = ["--ctx", "1024", "--threads", "2", "--backend", "llamacpp", "--speculative", "ngram", "--num-speculative-tokens", "3"]
    options = [load_options(parse_command_line([verb, "starter", *load])) for verb in ("run", "chat", "serve", "bench")]
    assert all(o == options[0] for o in options)
    first = options[0]
    assert (first.n_ctx, first.n_threads, first.backend) == (1024, 2, "llamacpp")
    assert (first.speculation.method, first.speculation.num_tokens) == ("ngram", 3)
    args = parse_command_line(["chat", "starter", *load, *FLAGS])
    defaults = chat_defaults(args, sampling_from(args))
    assert defaults.n_ctx == 1024 and defaults.sampling == sampling_from(args)  # every sampling flag, as SamplingParams
