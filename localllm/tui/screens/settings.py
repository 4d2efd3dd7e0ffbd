"""Per-chat settings: system prompt, temperature, top-p, max tokens, context."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from localllm.tui.conversations import ChatSettings


class SettingsScreen(ModalScreen[ChatSettings | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: ChatSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(classes="dialog settings"):
            yield Label("Chat settings  (Ctrl+S save · Esc cancel)")
            yield Label("System prompt")
            yield TextArea(s.system, id="system")
            with Grid(id="numbers"):
                yield Label("Temperature")
                yield Input(str(s.temperature), id="temperature", type="number")
                yield Label("Top-p")
                yield Input(str(s.top_p), id="top_p", type="number")
                yield Label("Max tokens")
                yield Input("" if s.max_tokens is None else str(s.max_tokens), id="max_tokens", type="integer",
                            placeholder="no limit")
                yield Label("Context")
                yield Input("" if s.context is None else str(s.context), id="context", type="integer",
                            placeholder="model default")
            yield Label("", id="problem")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        try:
            settings = self._read()
        except ValueError as exc:
            self.query_one("#problem", Label).update(str(exc))
            return
        self.dismiss(settings)

    def _read(self) -> ChatSettings:
        def number(field: str, kind, low, high, optional=False):
            text = self.query_one(f"#{field}", Input).value.strip()
            if optional and not text:
                return None
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(f"{field.replace('_', ' ')}: not a number") from None
            if not low <= value <= high:
                raise ValueError(f"{field.replace('_', ' ')} must be between {low} and {high}")
            return value

        return ChatSettings(
            system=self.query_one("#system", TextArea).text,
            temperature=number("temperature", float, 0.0, 5.0),
            top_p=number("top_p", float, 0.01, 1.0),
            max_tokens=number("max_tokens", int, 1, 1_000_000, optional=True),
            context=number("context", int, 256, 1_048_576, optional=True),
        )
