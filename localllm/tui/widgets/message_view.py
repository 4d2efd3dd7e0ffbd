"""One chat message: who said it, the Markdown body, and for replies the thoughts (collapsed) and timing figures."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Collapsible, Markdown, Static

from localllm.tui.conversations import Message


def stats_line(stats: dict | None, stopped: bool) -> str:
    """`TTFT 120 ms · 42 tokens · 55.1 tok/s`, plus how the reply ended when it did not end by itself."""
    if not stats:
        return "stopped" if stopped else ""
    parts = [
        f"TTFT {stats.get('ttft_s', 0) * 1000:.0f} ms",
        f"{stats.get('completion_tokens', 0)} tokens",
        f"{stats.get('tokens_per_s', 0):.1f} tok/s",
    ]
    if stopped:
        parts.append("stopped")
    elif stats.get("reason") == "length":
        parts.append("max tokens reached")
    elif stats.get("reason") == "error":
        parts.append("error")
    return " · ".join(parts)


class MessageView(Vertical):
    DEFAULT_CLASSES = "message"

    def __init__(self, message: Message) -> None:
        super().__init__(classes=f"message {message.role}")
        self.message = message

    def compose(self) -> ComposeResult:
        yield Static("You" if self.message.role == "user" else "Assistant", classes="role")
        if self.message.role == "assistant":
            # A reasoning model's thoughts, folded away above the answer; hidden until there are some.
            thoughts = Collapsible(Static(self.message.reasoning, markup=False, classes="thoughts-text"), title="Thoughts", classes="thoughts")
            thoughts.display = bool(self.message.reasoning)
            yield thoughts
        yield Markdown(self.message.content, classes="body")
        yield Static(stats_line(self.message.stats, self.message.stopped), classes="stats")

    @property
    def body(self) -> Markdown:
        return self.query_one(".body", Markdown)

    def show_thoughts(self, text: str) -> None:
        """The thoughts so far (the block stays as the user left it, folded or open)."""
        self.message.reasoning = text
        thoughts = self.query_one(".thoughts", Collapsible)
        thoughts.display = bool(text)
        thoughts.query_one(".thoughts-text", Static).update(text)

    def show_stats(self, stats: dict | None, stopped: bool) -> None:
        self.message.stats, self.message.stopped = stats, stopped
        self.query_one(".stats", Static).update(stats_line(stats, stopped))
