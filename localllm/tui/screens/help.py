"""The help screen: every key, in one place."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# localllm — keys

| key | what it does |
|---|---|
| **Enter** | send the message |
| **Ctrl+J** (or Shift+Enter where the terminal reports it) | new line in the message |
| **Esc** | stop the reply (the partial reply stays, marked *stopped*) |
| **Ctrl+R** | regenerate the last reply |
| **Ctrl+E** | edit the last message and send it again |
| **Ctrl+N** | new chat |
| **Ctrl+S** | chat settings: system prompt, temperature, top-p, max tokens, context |
| **Ctrl+F** | search chats · **F6** rename · **F8** delete · **Ctrl+B** show/hide the list |
| **F2 / F3 / F4 / F5** | chat / models / hardware / server |
| **Ctrl+P** | command palette: every action by name |
| **Ctrl+T** | dark / light theme |
| **Ctrl+Q** | quit |

**Models** (F3): Enter downloads a catalog model or switches the chat to an
installed one; **d** deletes an installed model; **c** cancels a download.

**Server** (F5): start or stop the OpenAI- and Ollama-compatible API on this
machine; its URL and key are shown there.

Chats are saved as you go and listed on the left; reopening one restores its
messages and settings.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog help"):
            yield Markdown(HELP)
