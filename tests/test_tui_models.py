"""The models screen: switching the chat's model, deleting, downloading with progress."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from localllm.core.config import Paths
from localllm.store.store import ModelStore
from localllm.tui.app import LocalLLMApp
from localllm.tui.screens.models import ModelsScreen
from tui_fakes import FakeFactory, FixedHardwareProbe, wait_until

SIZE = (100, 30)


@pytest.fixture
def home(tmp_path, starter_gguf) -> Path:
    """A store holding two models: `starter` and `second` (the same weights under another name)."""
    store = ModelStore(Paths(tmp_path))
    for name in ("starter", "second"):
        target = store.folder_for(name) / "model.gguf"
        os.link(starter_gguf, target)  # a hard link: the store refuses symbolic links it did not make
        store.add(name, source="test", file=target, sha256="0" * 64)
    return tmp_path


async def select_row(pilot, name: str) -> None:
    screen = pilot.app.screen
    assert isinstance(screen, ModelsScreen)
    index = [r.name for r in screen.rows].index(name)
    table = screen.query_one("DataTable")
    table.move_cursor(row=index)
    await wait_until(pilot, lambda: table.cursor_row == index)


def test_enter_on_an_installed_model_switches_the_chat(home):
    async def run():
        factory = FakeFactory()
        app = LocalLLMApp("starter", factory=factory, home=home, hardware_probe=FixedHardwareProbe())
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.session.current is not None)
            await pilot.press("f3")
            await select_row(pilot, "second")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.session.current is not None and app.session.current.name == "second")
            assert app.screen is app.chat
            assert factory.opened[-1].model_name == "second"
            assert factory.opened[0].closed, "the previous model is closed"

    asyncio.run(run())


def test_delete_asks_first_then_removes_the_model(home):
    async def run():
        app = LocalLLMApp("starter", factory=FakeFactory(), home=home, hardware_probe=FixedHardwareProbe())
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f3")
            await select_row(pilot, "second")
            await pilot.press("d")
            await pilot.press("escape")  # changed our mind
            assert app.store.get("second") is not None
            await pilot.press("d")
            await pilot.press("y")
            await wait_until(pilot, lambda: app.store.get("second") is None)
            assert "second" not in [r.name for r in app.screen.rows if r.installed]

    asyncio.run(run())


def test_models_screen_snapshot(snap_compare, home):
    async def models(pilot):
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ModelsScreen) and pilot.app.screen.rows)
        await pilot.pause()

    app = LocalLLMApp("starter", factory=FakeFactory(), home=home, hardware_probe=FixedHardwareProbe())
    assert snap_compare(app, terminal_size=SIZE, run_before=models)


@pytest.fixture
def hub(tiny_gguf, monkeypatch):
    """The hub emulator serving a catalog model's repository (a small, valid GGUF under its name)."""
    from hub_emulator import HubEmulator

    from localllm.store.catalog import default_catalog

    entry = default_catalog().get("llama3.2:1b")
    emulator = HubEmulator()
    emulator.add_repo(entry.gguf_repo, {"Llama-3.2-1B-Instruct-Q4_K_M.gguf": tiny_gguf, "README.md": b"# card\n"})
    with emulator:
        yield emulator.serve_as_the_hub(monkeypatch)


def test_enter_on_a_catalog_model_downloads_it_with_progress(home, hub):
    async def run():
        app = LocalLLMApp("starter", factory=FakeFactory(), home=home, hardware_probe=FixedHardwareProbe())
        hub.faults.throttle_bps["Llama-3.2-1B-Instruct-Q4_K_M.gguf"] = 4_000_000  # about 2 s: progress is visible
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f3")
            await select_row(pilot, "llama3.2:1b")
            await pilot.press("enter")
            screen = app.screen
            label = screen.query_one("#download-label")
            await wait_until(pilot, lambda: "downloading" in str(label.render()) and " MB/s" in str(label.render()))
            assert screen.query_one("#download-bar").progress > 0
            await wait_until(pilot, lambda: screen.downloading is None, timeout=30)
            assert app.store.get("llama3.2:1b") is not None
            row = next(r for r in screen.rows if r.name == "llama3.2:1b")
            assert row.installed
            table = screen.query_one("DataTable")
            assert table.get_row("llama3.2:1b")[1] == "installed"  # what the user sees in the STATUS column

    asyncio.run(run())


def test_a_download_can_be_cancelled_and_resumed(home, hub):
    async def run():
        app = LocalLLMApp("starter", factory=FakeFactory(), home=home, hardware_probe=FixedHardwareProbe())
        hub.faults.throttle_bps["Llama-3.2-1B-Instruct-Q4_K_M.gguf"] = 1_000_000
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f3")
            await select_row(pilot, "llama3.2:1b")
            await pilot.press("enter")
            screen = app.screen
            await wait_until(pilot, lambda: screen.query_one("#download-bar").progress > 500_000)
            await pilot.press("c")
            await wait_until(pilot, lambda: screen.downloading is None)
            assert app.store.get("llama3.2:1b") is None
            assert any("cancelled" in n.message for n in app._notifications)
            hub.faults.throttle_bps.clear()
            await select_row(pilot, "llama3.2:1b")
            await pilot.press("enter")
            await wait_until(pilot, lambda: screen.downloading is None and app.store.get("llama3.2:1b") is not None, timeout=30)
        ranges = [s.range for s in hub.gets("Llama-3.2-1B-Instruct-Q4_K_M.gguf")]
        assert ranges[-1] and not ranges[-1].startswith("bytes=0-"), f"the second download resumed: {ranges}"

    asyncio.run(run())
