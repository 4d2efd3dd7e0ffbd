"""Running the API: in the foreground for `localllm serve`, on a thread for `localllm bench`, or as a
task on the terminal UI's own event loop, where it shares the UI's model registry (so the chat's model
is served without a second copy, and the registry's asyncio state lives on one loop).

We bind the listening socket ourselves before uvicorn starts, so the address
is known (port 0 picks a free one) and a busy port is one clear error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from localllm.core.errors import BadRequest
from localllm.server.settings import ServerSettings

if TYPE_CHECKING:
    from localllm.server.registry import ModelRegistry

GRACE_S = 2  # on stop, requests still running get this long before they are cancelled
STOP_DEADLINE_S = 4.5  # `serve` is gone this long after SIGTERM or Ctrl+C, whatever was running


@dataclass
class Listening:
    socket: socket.socket
    url: str


def bind(settings: ServerSettings) -> Listening:
    """A listening socket on the settings' host and port; BadRequest if that fails."""
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BadRequest(f"cannot listen on {settings.host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise BadRequest(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return Listening(sock, f"http://{shown}:{port}")


def _uvicorn_server(settings: ServerSettings, app, *, own_signals: bool = True):
    """uvicorn for `app`; without `own_signals` it leaves Ctrl+C and SIGTERM to its host (the UI)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.localllm.registry.stop_generating()  # replies end now, complete, not cut at the grace's end
            await super().shutdown(sockets)

        def capture_signals(self):
            return super().capture_signals() if own_signals else contextlib.nullcontext()

    config = uvicorn.Config(
        app,
        log_level="info" if settings.load.verbose else "warning",
        access_log=settings.load.verbose,
        server_header=False,
        timeout_graceful_shutdown=GRACE_S,
    )
    return Server(config)


def _exit_by_deadline(server, finished: threading.Event) -> None:
    """Once a stop is asked for, make sure the process is gone STOP_DEADLINE_S later.

    The event loop is free to act on the signal at once (model work runs on
    other threads), requests get GRACE_S to finish and models unload; this is
    the backstop for whatever still holds the process (a model half loaded).
    """

    def watch() -> None:
        while not server.should_exit:
            if finished.wait(0.1):
                return
        if not finished.wait(STOP_DEADLINE_S):
            print(f"localllm: still stopping after {STOP_DEADLINE_S:g} s; exiting now", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watch, name="stop-deadline", daemon=True).start()


def prepare(settings: ServerSettings, registry: ModelRegistry | None = None):
    """Validate settings and resolve the start-up model, before any port is taken; the app.

    A host's `registry` (the UI's) is shared: the server opens models with its options, not `settings`'."""
    from localllm.server.app import create_app
    from localllm.server.registry import ModelRegistry

    settings.validate()
    if registry is None:
        registry = ModelRegistry(settings)
    registry.stopping = False  # a registry outlives a server that stopped: the next one starts afresh
    if settings.model:
        registry.set_startup_model(settings.model)
    return create_app(settings, registry)


def serve(settings: ServerSettings) -> None:
    """Serve until Ctrl+C or SIGTERM (`localllm serve`)."""
    app = prepare(settings)
    listening = bind(settings)
    if settings.insecure_no_auth and settings.api_key is None:
        print(f"WARNING: serving {settings.host} without an API key (--insecure-no-auth): anyone who can reach "
              "this address can use it", file=sys.stderr)
    print(f"localllm API on {listening.url}  (OpenAI: {listening.url}/v1  Ollama: {listening.url}/api)",
          file=sys.stderr, flush=True)
    server = _uvicorn_server(settings, app)
    finished = threading.Event()
    _exit_by_deadline(server, finished)
    try:
        server.run(sockets=[listening.socket])
    finally:
        finished.set()


class ServerThread:
    """The API on a background thread, for front ends that host it (the terminal UI)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.url: str | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> str:
        app = prepare(self.settings)
        listening = bind(self.settings)
        self._server = _uvicorn_server(self.settings, app)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listening.socket]}, name="localllm-api", daemon=True
        )
        self._thread.start()
        for _ in range(int(timeout_s * 20)):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.05)
        if not self._server.started:
            self.stop()
            raise BadRequest("the API server did not start")
        self.url = listening.url
        return self.url

    def stop(self) -> None:
        """Return once the server has stopped: its port closed, its requests ended, its models unloaded."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STOP_DEADLINE_S)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True  # uvicorn stops waiting for connections and tasks
            self._thread.join()
        self._server = self._thread = None


class HostedServer:
    """The API as a task on the caller's event loop, serving the host's model registry (the terminal UI).

    uvicorn runs on the UI's loop, so the registry and its leases live on one loop; models run on
    their engine threads and request parsing is light, so the UI stays responsive.
    """

    def __init__(self, settings: ServerSettings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.url: str | None = None
        self._server = None
        self._task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 30.0) -> str:
        app = prepare(self.settings, self.registry)
        listening = bind(self.settings)
        self._server = server = _uvicorn_server(self.settings, app, own_signals=False)
        self._task = asyncio.create_task(server.serve(sockets=[listening.socket]), name="localllm-api")
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not server.started and not self._task.done() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if not server.started:
            await self.stop()
            listening.socket.close()
            raise BadRequest("the API server did not start")
        self.url = listening.url
        return self.url

    async def stop(self, deadline_s: float = STOP_DEADLINE_S) -> None:
        """Return once the server has stopped: its port closed, its requests ended, the models only it used
        unloaded. Requests still running after `deadline_s` are cut."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        done, _ = await asyncio.wait({task}, timeout=deadline_s)
        if not done:
            server.force_exit = True  # uvicorn stops waiting for connections and tasks
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: a server that failed has stopped all the same
