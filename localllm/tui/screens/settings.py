"""Per-chat settings: the system prompt, every sampling flag of `localllm chat`, max tokens and the context."""

from __future__ import annotations

from dataclasses import replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from localllm.tui.conversations import ChatSettings

ESCAPES = {"n": "\n", "t": "\t", ",": ",", "\\": "\\"}


def format_stops(stops: list[str]) -> str:
    """Stop strings as one line: comma-separated, with \\n, \\t, \\, and \\\\ for what a line cannot show."""
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace(",", "\\,").replace("\n", "\\n").replace("\t", "\\t")

    return ",".join(escape(s) for s in stops)


def parse_stops(text: str) -> list[str]:
    """The inverse of format_stops; empty pieces are ignored (a stop string is never empty)."""
    stops, current, chars = [], "", iter(text)
    for ch in chars:
        if ch == "\\":
            following = next(chars, "\\")
            current += ESCAPES.get(following, "\\" + following)
        elif ch == ",":
            stops.append(current)
            current = ""
        else:
            current += ch
    stops.append(current)
    return [s for s in stops if s]


# (field, label, kind, low, high, optional placeholder); None placeholder: a value is required.
# Every field but n_ctx is one of the chat's SamplingParams.
NUMBERS = [
    ("temperature", "Temperature", float, 0.0, 5.0, None),
    ("top_p", "Top-p", float, 0.01, 1.0, None),
    ("top_k", "Top-k", int, 0, 1_000_000, None),
    ("min_p", "Min-p", float, 0.0, 1.0, None),
    ("repeat_penalty", "Repeat penalty", float, 0.01, 10.0, None),
    ("seed", "Seed", int, 0, 2**32 - 1, "random"),
    ("max_tokens", "Max tokens", int, 1, 1_000_000, "no limit"),
    ("n_ctx", "Context", int, 256, 1_048_576, "model default"),
]


class SettingsScreen(ModalScreen[ChatSettings | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: ChatSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with VerticalScroll(classes="dialog settings"):
            yield Label("Chat settings  (Ctrl+S save · Esc cancel)")
            yield Label("System prompt")
            yield TextArea(s.system, id="system")
            with Grid(id="numbers"):
                for field, label, kind, _, _, placeholder in NUMBERS:
                    value = s.n_ctx if field == "n_ctx" else getattr(s.sampling, field)
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=field,
                                type="integer" if kind is int else "number", placeholder=placeholder or "")
            with Horizontal(id="stop-row"):
                yield Label("Stop strings")
                yield Input(format_stops(s.sampling.stop), id="stop", placeholder="none (comma-separated; \\n is a new line)")
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
        values = {}
        for field, label, kind, low, high, placeholder in NUMBERS:
            text = self.query_one(f"#{field}", Input).value.strip()
            if placeholder is not None and not text:
                values[field] = None
                continue
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(f"{label}: not a{'n integer' if kind is int else ' number'}") from None
            if not low <= value <= high:
                raise ValueError(f"{label} must be between {low} and {high}")
            values[field] = value
        stop = parse_stops(self.query_one("#stop", Input).value)
        if len(stop) > 16:
            raise ValueError("at most 16 stop strings")
        n_ctx = values.pop("n_ctx")
        sampling = replace(self.settings.sampling, stop=stop, **values)  # fields not shown here are kept
        return ChatSettings(self.query_one("#system", TextArea).text, sampling, n_ctx)
