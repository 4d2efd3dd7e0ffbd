"""The Textual app: `localllm chat [MODEL]`.

Screens are modes (F2 chat, F3 models, F4 hardware, F5 server) so each keeps
its state while you look elsewhere. The app owns what they share: the saved
conversations, the model registry (the one owner of loaded models: the chat
holds its model there and the F5 server serves from it), the hardware probe
and the API server.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from localllm.backends.base import Backend
from localllm.backends.select import LoadOptions
from localllm.core.config import Paths, home_dir
from localllm.core.errors import BackendError
from localllm.server.registry import ModelRegistry
from localllm.server.settings import DEFAULT_PARALLEL, ServerSettings
from localllm.store.store import DEFAULT_CHAT_MODEL, ModelStore
from localllm.tui.conversations import ChatSettings, ConversationStore
from localllm.tui.screens.chat import ChatScreen
from localllm.tui.screens.hardware import HardwareProbe, HardwareScreen
from localllm.tui.screens.help import HelpScreen
from localllm.tui.screens.models import ModelsScreen
from localllm.tui.screens.server import ServerScreen
from localllm.tui.session import BackendFactory, ModelLoaded, ModelLoadFailed, ModelSession

QUIT_WAIT_S = 0.8  # quitting waits this long for engines to close, then leaves them to finish alone


class LocalLLMApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "localllm"
    MODES = {"chat": "chat-screen", "models": "models-screen", "hardware": "hardware-screen", "server": "server-screen"}
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("f2", "switch_mode('chat')", "Chat"),
        Binding("f3", "switch_mode('models')", "Models"),
        Binding("f5", "switch_mode('server')", "Server"),
        Binding("f4", "switch_mode('hardware')", "Hardware"),
        Binding("ctrl+t", "toggle_dark", "Theme", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        model: str = DEFAULT_CHAT_MODEL,
        *,
        factory: BackendFactory | None = None,
        home: Path | None = None,
        hardware_probe: HardwareProbe | None = None,
        defaults: ChatSettings | None = None,
        load: LoadOptions | None = None,
    ) -> None:
        """`load`: how models open (the command's flags); `factory`: a stand-in that finds and opens them instead."""
        super().__init__()
        self.default_model = model
        self.default_settings = defaults or ChatSettings()
        self.home = home or home_dir()
        self.conversations = ConversationStore(self.home / "conversations.sqlite3")
        self.store = ModelStore(Paths(self.home))
        # The server's defaults: the requests a model runs at once match llama.cpp's default slots,
        # so a chat's model opens as it would alone; max_loaded counts models besides the chat's.
        settings = ServerSettings(load=load or LoadOptions(), parallel=DEFAULT_PARALLEL)
        self.registry = ModelRegistry(settings, self.store, opener=factory.open if factory else None)
        resolve = factory.resolve if factory else self.registry.operator_model
        self.session = ModelSession(self.registry, resolve, self.post_message)
        self.hardware_probe = hardware_probe or HardwareProbe()
        self.chat = ChatScreen()
        self.server_panel = ServerScreen()
        self._model_changed = asyncio.Event()
        self._load_failure: tuple[str, str] | None = None

    def on_mount(self) -> None:
        self.chat.draft_settings = replace(self.default_settings)
        self.install_screen(self.chat, "chat-screen")
        self.install_screen(ModelsScreen(), "models-screen")
        self.install_screen(HardwareScreen(), "hardware-screen")
        self.install_screen(self.server_panel, "server-screen")
        self.switch_mode("chat")
        self.ensure_model(self.default_model, self.default_settings.n_ctx)

    # -- the shared model -------------------------------------------------------------
    def ensure_model(self, model: str, n_ctx: int | None) -> None:
        """Start loading `model` unless it is loaded or on its way."""
        if self.session.is_loaded(model, n_ctx) or self.session.loading == model:
            return
        self.session.load(model, n_ctx)
        self._refresh_status()

    async def wait_for_model(self, model: str, n_ctx: int | None) -> Backend:
        self.ensure_model(model, n_ctx)
        while not self.session.is_loaded(model, n_ctx):
            if self._load_failure and self._load_failure[0] == model and self.session.loading is None:
                raise BackendError(f"{model} could not be loaded: {self._load_failure[1]}")
            self._model_changed.clear()
            await self._model_changed.wait()
        assert self.session.backend is not None
        return self.session.backend

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self._load_failure = None
        self._model_changed.set()
        self._refresh_status()

    def on_model_load_failed(self, message: ModelLoadFailed) -> None:
        self._load_failure = (message.model, message.reason)
        self._model_changed.set()
        self.notify(f"{message.model} could not be loaded: {message.reason}", severity="error", timeout=10)
        self._refresh_status()

    def _refresh_status(self) -> None:
        if self.chat.is_mounted:
            self.chat.show_model_status()

    def backend_explanation(self) -> str:
        current = self.session.current
        if current is None:
            return "Backend: none loaded yet"
        from localllm.tui.backend_explanation import explain_backend

        return explain_backend(current.name, current.backend, self.hardware_probe.facts)

    # -- actions ---------------------------------------------------------------------
    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_dark(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "Every key and what it does", self.action_help)
        yield SystemCommand("Chat", "The chat screen", lambda: self.switch_mode("chat"))
        yield SystemCommand("Models", "Installed models, the catalog and downloads", lambda: self.switch_mode("models"))
        yield SystemCommand("Hardware", "CPU, RAM, GPUs and the active backend", lambda: self.switch_mode("hardware"))
        yield SystemCommand("Server", "Start or stop the local API server", lambda: self.switch_mode("server"))
        yield SystemCommand("Start or stop the API server", "The OpenAI- and Ollama-compatible API", self.server_panel.action_toggle_server)
        yield SystemCommand("Toggle theme", "Dark or light", self.action_toggle_dark)
        chat = self.chat
        if chat.is_mounted:
            for action, title, help_text in (
                ("new_chat", "New chat", "Start a new conversation"),
                ("stop", "Stop reply", "Stop the reply being written"),
                ("regenerate", "Regenerate", "Write the last reply again"),
                ("edit_last", "Edit last message", "Put the last message back in the box"),
                ("settings", "Chat settings", "System prompt, temperature, top-p, max tokens, context"),
                ("rename", "Rename chat", "Give this chat a title"),
                ("delete_chat", "Delete chat", "Delete this chat"),
                ("search", "Search chats", "Find a chat by its text"),
                ("toggle_sidebar", "Toggle chat list", "Show or hide the list of chats"),
            ):
                yield SystemCommand(title, help_text, getattr(chat, f"action_{action}"))

    async def action_quit(self) -> None:
        self.exit()

    async def on_unmount(self) -> None:
        """Stop a streaming reply (it saves what it wrote), then the server, then free the models and the database."""
        replies = [w for w in self.workers if w.group == "reply"]
        for worker in replies:
            worker.cancel()
        for worker in replies:
            try:
                await asyncio.wait_for(worker.wait(), timeout=0.5)
            except Exception:  # cancelled or failed: either way it is over
                pass
        await self.server_panel.shutdown()

        async def free_models() -> None:
            await self.session.close()
            await self.registry.close()

        try:
            await asyncio.wait_for(free_models(), timeout=QUIT_WAIT_S)  # closes still running go on alone
        except asyncio.TimeoutError:
            pass
        self.conversations.close()
