"""The server panel: start and stop the local OpenAI- and Ollama-compatible API from the app.

The server runs on the app's own event loop and serves the app's model registry,
so the chat's model answers API requests too, without a second copy in memory.
Starting and stopping run as tasks that report back with `post_message`, so the
UI stays responsive: "stopped" is shown once uvicorn has ended, that is once its
port is closed and no request is running.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Static, Switch

from localllm.core.errors import LocalLLMError


class ServerStarted(Message):
    def __init__(self, server, url: str) -> None:
        super().__init__()
        self.server, self.url = server, url


class ServerFailed(Message):
    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class ServerStopped(Message):
    """The server's thread has ended: its port is closed and no request runs any more."""


class ServerScreen(Screen):
    BINDINGS = [Binding("ctrl+o", "toggle_server", "Start/stop server")]

    def __init__(self) -> None:
        super().__init__(name="server")
        self.server = None  # a localllm.server.run.HostedServer while running
        self.api_key: str | None = None
        self.starting = False
        self.stopping = False
        self._task: asyncio.Task | None = None  # the start or stop under way (kept: the loop holds tasks weakly)
        self._launching = None  # the server being started, until the panel takes it

    def compose(self) -> ComposeResult:
        from localllm.server.settings import DEFAULT_PORT

        yield Header()
        with VerticalScroll(id="server"):
            yield Static("[b]Local API server[/b]: OpenAI- and Ollama-compatible, on this machine only (127.0.0.1).")
            with Horizontal(classes="field"):
                yield Label("Port")
                yield Input(str(DEFAULT_PORT), id="port", type="integer")
            with Horizontal(classes="field"):
                yield Label("Require an API key")
                yield Switch(value=True, id="require-key")
            yield Button("Start server", id="toggle", variant="primary")
            yield Static("stopped", id="server-status")
            yield Static("", id="server-usage")
        yield Footer()

    @on(Button.Pressed, "#toggle")
    def action_toggle_server(self) -> None:
        if self.starting or self.stopping:
            return
        if self.server is not None:
            self.stop()
        else:
            self.start()

    def start(self) -> None:
        from localllm.server.run import HostedServer

        try:
            port = int(self.query_one("#port", Input).value or "0")
        except ValueError:
            self.notify("the port must be a number", severity="error")
            return
        self.api_key = secrets.token_urlsafe(18) if self.query_one("#require-key", Switch).value else None
        registry = self.app.registry
        settings = replace(registry.settings, port=port, api_key=self.api_key, model=None)
        self.starting = True
        self.query_one("#server-status", Static).update("starting …")
        server = self._launching = HostedServer(settings, registry)

        async def run() -> None:
            try:
                url = await server.start()
            except LocalLLMError as exc:
                self.post_message(ServerFailed(str(exc)))
            except Exception as exc:  # the app reports, never crashes
                self.post_message(ServerFailed(f"{type(exc).__name__}: {exc}"))
            else:
                self.post_message(ServerStarted(server, url))  # the panel takes it with its status, in one step

        self._task = asyncio.create_task(run(), name="start-api")

    @on(ServerStarted)
    def _started(self, message: ServerStarted) -> None:
        self.starting = False
        self.server, self._launching = message.server, None
        key = self.api_key
        self.query_one("#toggle", Button).label = "Stop server"
        self.query_one("#server-status", Static).update(
            f"[b]running[/b] at {message.url}\nOpenAI base URL: {message.url}/v1 · Ollama: {message.url}\n"
            f"API key: {key if key else 'none (anyone on this machine can use it)'}"
        )
        auth = f' -H "Authorization: Bearer {key}"' if key else ""
        self.query_one("#server-usage", Static).update(
            "Try it:\n"
            f"  curl {message.url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"starter\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"
        )
        self.notify(f"API server running at {message.url}")

    @on(ServerFailed)
    def _failed(self, message: ServerFailed) -> None:
        self.starting = False
        self.server = self._launching = None
        self.query_one("#server-status", Static).update(f"stopped: {message.reason}")
        self.notify(f"the server did not start: {message.reason}", severity="error", timeout=10)

    def stop(self) -> None:
        """Stop in a task; the panel says "stopped" only once the port is closed and no request runs."""
        server, self.server = self.server, None
        if server is None:
            return
        self.stopping = True
        self.query_one("#server-status", Static).update("stopping …")
        self.query_one("#server-usage", Static).update("")

        async def run() -> None:
            try:
                await server.stop()
            finally:
                self.post_message(ServerStopped())

        self._task = asyncio.create_task(run(), name="stop-api")

    @on(ServerStopped)
    def _stopped(self, message: ServerStopped) -> None:
        self.stopping = False
        self.query_one("#toggle", Button).label = "Start server"
        self.query_one("#server-status", Static).update("stopped")

    async def shutdown(self) -> None:
        """On quit: stop (one still starting too), waiting at most a moment (requests still running are cut)."""
        server = self.server or self._launching
        self.server = self._launching = None
        if server is not None:
            try:
                await asyncio.wait_for(server.stop(deadline_s=0.5), timeout=1.0)
            except asyncio.TimeoutError:
                pass
