"""Screenshots of the app's screens at 100x30 with a deterministic backend and hardware.

Update them deliberately with `pytest tests/test_tui_snapshots.py --snapshot-update`
after looking at the new pictures.
"""

from __future__ import annotations

from pathlib import Path

from localllm.tui.app import LocalLLMApp
from tui_fakes import FakeFactory, FixedHardwareProbe, wait_until

SIZE = (100, 30)


def make_app(tmp_path: Path) -> LocalLLMApp:
    return LocalLLMApp("starter", factory=FakeFactory(), home=tmp_path, hardware_probe=FixedHardwareProbe())


async def _loaded(pilot) -> None:
    while pilot.app.session.current is None:
        await pilot.pause(0.05)


async def _steady(pilot) -> None:
    """No focus, so no blinking cursor: otherwise every picture is a coin toss."""
    pilot.app.screen.set_focus(None)
    await wait_until(pilot, lambda: pilot.app.screen.focused is None)
    await pilot.pause()  # the messages the change queued are handled


def test_chat_screen_with_a_reply(snap_compare, tmp_path):
    async def chat(pilot):
        await _loaded(pilot)
        for key in "Show me some code":
            await pilot.press("space" if key == " " else key)
        await pilot.press("enter")
        while pilot.app.screen.request_id is not None or not pilot.app.screen.query("MessageView"):
            await pilot.pause(0.05)
        await _steady(pilot)

    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=chat)


def test_hardware_screen(snap_compare, tmp_path):
    async def hardware(pilot):
        await _loaded(pilot)
        await pilot.press("f4")
        await wait_until(pilot, lambda: "Example CPU" in str(pilot.app.screen.query_one("#cpu-facts").render()))
        await pilot.pause()

    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=hardware)


def test_chat_screen_light_theme_at_80x24(snap_compare, tmp_path):
    async def light(pilot):
        await _loaded(pilot)
        await pilot.press("ctrl+t")
        await _steady(pilot)

    assert snap_compare(make_app(tmp_path), terminal_size=(80, 24), run_before=light)
