"""The models a server holds in memory, loaded when a request names them.

A request *leases* its model: `acquire` returns a Lease that keeps the model
loaded until `release`. Between leases a model stays for its keep-alive time
(the server's `--keep-alive`, or the last request's own `keep_alive`), then a
reaper unloads it. At most `max_loaded` models are in memory: a new one evicts
the least recently used idle model, or waits until one is idle. Two requests
for a model that is loading share the load.

A front end that shows a model itself (the terminal UI's chat) *holds* it
instead: `hold` loads it like a request would, and while it is held it is
never evicted, reaped or unloaded by a server stop, and requests that name it
run on that same backend (with the context it was held with) rather than a
second copy. Held models do not count against `max_loaded`: that limit is
what the server keeps besides them. Letting go (`let_go`) unloads it
once no request runs on it.

Admission control lives here too: the server accepts `parallel + max_queue`
requests at once (running, queued for an engine, or waiting for a load) and
answers the next with QueueFull (HTTP 429).

Requests may name installed models (and `starter`, installed on first use), the
model the server was started with and the models a front end holds; never any
other file path, so a client cannot make the server open arbitrary files. Names routed to an upstream server
(remotes.toml, see localllm.backends.remotes) and, under `--backend remote`, every name
open the remote backend instead: those models live on the upstream.
"""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Callable

from localllm.backends.base import Backend

from localllm.core.requests import EngineStats
from localllm.core.errors import BadRequest, ModelNotFound, QueueFull
from localllm.backends.remotes import RemoteModel
from localllm.server.offloop import in_thread
from localllm.server.settings import ServerSettings
from localllm.store.own_files import check_model_name as check_store_name
from localllm.store.bundled import resolve_installing
from localllm.store.refs import parse_ref
from localllm.store.store import STARTER_NAME, ModelStore, ResolvedModel

Opener = Callable[[ResolvedModel, "int | None"], Backend]
_KEEP = object()  # "leave the model's keep-alive as it is"


def _looks_like_path(name: str) -> bool:
    if name.startswith("hf:"):
        return False
    return name.startswith((".", "~")) or "/" in name or "\\" in name or name.lower().endswith(".gguf")


def check_model_name(name: str) -> None:
    """The store's name check (length, control characters, valid Unicode), worded for a
    request's `model` field: BadRequest, an HTTP 400. An empty name is left to the 404."""
    if not name:
        return
    try:
        check_store_name(name)
    except BadRequest as exc:
        raise BadRequest(f"'model': {exc}") from None


def canonical_name(name: str) -> str:
    """Ollama clients say `starter:latest` for `starter`."""
    name = name.strip()
    return name[: -len(":latest")] if name.endswith(":latest") else name


@dataclass
class LoadedModel:
    name: str
    resolved: ResolvedModel
    backend: Backend
    n_ctx: int | None
    load_s: float
    keep_alive_s: float | None  # None: stays until evicted or the server stops
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    holders: int = 0  # front ends holding it (the chat): kept loaded whatever the keep-alive says
    load: dict[str, Any] = field(default_factory=dict)  # the request's LoadOptions it was loaded with (num_thread...)

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.holders == 0

    def expires_at(self) -> datetime | None:
        """Wall-clock time when it unloads if unused, for /api/ps; None when it never expires."""
        if self.keep_alive_s is None:
            return None
        idle = 0.0 if not self.idle else time.monotonic() - self.last_used
        return datetime.now(timezone.utc) + timedelta(seconds=max(0.0, self.keep_alive_s - idle))


class Lease:
    """One request's (or, `held`, one front end's) hold on a loaded model; `release` is idempotent."""

    def __init__(self, registry: "ModelRegistry", model: LoadedModel, load_s: float, *, held: bool = False) -> None:
        self.registry = registry
        self.model = model
        self.load_s = load_s  # seconds this request waited for a load (0 if it was loaded)
        self.held = held
        self.keep_alive_s: object = _KEEP
        self._released = False

    @property
    def backend(self) -> Backend:
        return self.model.backend

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.registry._release(self)


class ModelRegistry:
    def __init__(
        self,
        settings: ServerSettings,
        store: ModelStore | None = None,
        opener: Opener | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or ModelStore()
        self._opener = opener or self._open_backend
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._pending = 0  # admitted requests not yet released
        self._generating: dict[str, Backend] = {}  # request id -> its backend, while it generates
        self.stopping = False  # the server is shutting down: generations are aborted, no new ones start
        self._changed = asyncio.Event()
        self._preloaded: ResolvedModel | None = None
        self.preload_state = "none"  # none | loading | ready | failed
        self.preload_error: str | None = None

    # -- names ----------------------------------------------------------------
    def resolve(self, name: str) -> ResolvedModel:
        """The model a request names (installed, catalog alias, `starter`), or ModelNotFound.

        A request's name is a store name, never a path: it is checked as text
        first (BadRequest), and a name the store does not hold is the same 404
        whatever files happen to exist where the server runs.
        """
        name = canonical_name(name)
        check_model_name(name)
        if self._preloaded is not None and name == self._preloaded.name:
            return self._preloaded
        held = self._models.get(name)
        if held is not None and held.holders:
            return held.resolved  # the chat's model, a file path included: the operator chose it
        remote = self._remote(name)
        if remote is not None:
            return remote
        not_found = ModelNotFound(f"model '{name}' not found: requests name installed models (`localllm ls`), not files")
        if not name or _looks_like_path(name):
            raise not_found
        if name != STARTER_NAME and not self._installed(name) and parse_ref(name) is None:
            raise not_found  # not installed, and no catalog or hf: name: the store must not look further
        resolved = resolve_installing(self.store, name)
        if resolved.manifest is None and name != STARTER_NAME:
            raise not_found
        return resolved

    def _installed(self, name: str) -> bool:
        try:
            return self.store.get(name) is not None
        except OSError as exc:  # a name too long for a file name, ...: not a name the store holds
            if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL):
                return False
            raise

    async def find(self, name: str) -> ResolvedModel:
        """`resolve` on a worker thread: the store reads manifests, and `starter` is installed on first use."""
        return await in_thread(self.resolve, name)

    def _remote(self, name: str) -> RemoteModel | None:
        """A routed name, or any name when the server fronts one upstream (--backend remote)."""
        route = self.settings.remotes.get(name)
        if route is not None:
            return RemoteModel.named(name, route.model)
        if self.settings.load.backend == "remote" and name:
            return RemoteModel.named(name)  # the upstream decides whether it exists
        return None

    def known_names(self) -> list[str]:
        names = {m.name for m in self.store.list()} | set(self._models) | set(self.settings.remotes)
        if self._preloaded is not None:
            names.add(self._preloaded.name)
        return sorted(names)

    # -- leases ---------------------------------------------------------------
    async def acquire(self, name: str, *, n_ctx: int | None = None, load: dict[str, Any] | None = None) -> Lease:
        """Lease model `name`, loading it if needed. Raises ModelNotFound, QueueFull, load errors.

        `load`: LoadOptions fields (n_threads, n_gpu_layers) that apply if this request loads the
        model; a loaded model is not reloaded for them (`lease.model.load` says what it got)."""
        resolved = await self.find(name)
        limit = self.settings.parallel + self.settings.max_queue
        if self._pending >= limit:
            raise QueueFull(
                f"the server is busy: {self._pending} requests are running or queued (limit {limit}); retry shortly",
                retry_after_s=1,
            )
        self._pending += 1
        started = time.monotonic()
        try:
            model = await self._get(resolved, n_ctx, load)
        except BaseException:
            self._pending -= 1
            self._notify()
            raise
        model.in_flight += 1
        waited = time.monotonic() - started
        return Lease(self, model, waited if waited > 0.05 else 0.0)

    async def hold(self, resolved: ResolvedModel, *, n_ctx: int | None = None) -> Lease:
        """A front end's hold on `resolved` (resolved by the operator's rules: paths allowed), loading it
        if needed. Not a request: no admission, no keep-alive; kept loaded until the lease is released."""
        started = time.monotonic()
        while True:
            model = await self._get(resolved, n_ctx)
            if self._models.get(model.name) is model:  # not unloaded (a server stop) while we waited
                break
        model.holders += 1
        waited = time.monotonic() - started
        return Lease(self, model, waited if waited > 0.05 else 0.0, held=True)

    async def let_go(self, lease: Lease) -> None:
        """A holder's end: release, then unload the model now if idle, else once the requests on it end."""
        lease.release()
        model = lease.model
        if self._models.get(model.name) is not model:
            return
        if model.idle:
            await self._unload(model)
        elif not model.holders:
            model.keep_alive_s = 0.0  # the reaper takes it once idle

    def _release(self, lease: Lease) -> None:
        model = lease.model
        model.last_used = time.monotonic()
        if lease.held:
            model.holders -= 1
            self._notify()
            return
        model.in_flight -= 1
        if lease.keep_alive_s is not _KEEP:
            model.keep_alive_s = lease.keep_alive_s  # type: ignore[assignment]
        self._pending -= 1
        self._notify()

    async def _get(self, resolved: ResolvedModel, n_ctx: int | None, load: dict[str, Any] | None = None) -> LoadedModel:
        name = resolved.name
        while True:
            model = self._models.get(name)
            if model is not None and (n_ctx is None or model.n_ctx == n_ctx or model.holders):
                return model  # a held model is served as it is held: it cannot reload under its holder
            if model is not None:  # loaded with another context size: reload once idle
                if model.idle:
                    await self._unload(model)
                else:
                    await self._wait_for_change()
                continue
            if name in self._loading:
                await asyncio.shield(self._loading[name])
                continue
            kept = sum(1 for m in self._models.values() if not m.holders)
            if kept + len(self._loading) >= self.settings.max_loaded:
                idle = [m for m in self._models.values() if m.idle]
                if idle:
                    await self._unload(min(idle, key=lambda m: m.last_used))
                else:
                    await self._wait_for_change()
                continue
            task = asyncio.create_task(self._load(resolved, n_ctx, load or {}))
            self._loading[name] = task
            return await asyncio.shield(task)

    async def _load(self, resolved: ResolvedModel, n_ctx: int | None, load: dict[str, Any]) -> LoadedModel:
        started = time.monotonic()
        if self._opener != self._open_backend:
            load = {}  # a front end's own opener (the TUI's, a test's) takes no per-request settings
        try:
            backend = await in_thread(partial(self._open_backend, load=load) if load else self._opener, resolved, n_ctx)
            model = LoadedModel(
                name=resolved.name,
                resolved=resolved,
                backend=backend,
                n_ctx=backend.n_ctx,
                load_s=time.monotonic() - started,
                keep_alive_s=self.settings.keep_alive_s,
                load=load,
            )
            self._models[resolved.name] = model
            return model
        finally:
            del self._loading[resolved.name]
            self._notify()

    def _open_backend(self, resolved: ResolvedModel, n_ctx: int | None, load: dict[str, Any] | None = None) -> Backend:
        from localllm.backends.select import open_backend, with_n_ctx

        s = self.settings
        options = replace(with_n_ctx(s.load, n_ctx), n_parallel=s.parallel, **(load or {}))
        route = s.remotes.get(resolved.name)
        if route is not None:
            options = replace(
                options, backend="remote", remote_url=route.url, remote_api_key=route.api_key(), remote_timeout_s=route.timeout_s
            )
        return open_backend(resolved, options)

    # -- generations ----------------------------------------------------------
    def generation_started(self, request_id: str, backend: Backend) -> None:
        self._generating[request_id] = backend

    def generation_ended(self, request_id: str) -> None:
        self._generating.pop(request_id, None)

    def stop_generating(self) -> None:
        """On shutdown: abort every generation, so each reply ends now, complete, instead of being cut."""
        self.stopping = True
        for request_id, backend in list(self._generating.items()):
            backend.abort(request_id)

    # -- unloading ------------------------------------------------------------
    async def unload(self, name: str) -> None:
        """Unload `name` now if it is idle, else as soon as its requests end."""
        model = self._models.get(canonical_name(name))
        if model is None:
            return
        if not model.idle:
            model.keep_alive_s = 0.0  # the reaper takes it once idle (and no longer held)
            return
        await self._unload(model)

    async def _unload(self, model: LoadedModel) -> None:
        if self._models.get(model.name) is model:
            del self._models[model.name]
            await in_thread(model.backend.close)
            self._notify()

    async def reap_idle(self) -> None:
        """Unload every idle model whose keep-alive has run out."""
        now = time.monotonic()
        for model in list(self._models.values()):
            if model.idle and model.keep_alive_s is not None and now - model.last_used >= model.keep_alive_s:
                await self._unload(model)

    async def run_reaper(self, interval_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.reap_idle()

    def forget(self, name: str) -> None:
        """A model removed from the store: if it was the start-up model, requests no longer reach its old files."""
        if self._preloaded is not None and self._preloaded.name == name:
            self._preloaded = None

    def set_startup_model(self, ref: str) -> ResolvedModel:
        """The model named on the command line; it may also be a .gguf path (the operator's choice).

        Resolved at once, so a wrong name fails before the server binds its port.
        """
        self._preloaded = self.operator_model(ref)
        self.preload_state = "loading"  # from now on, so /health never says ready before the load
        return self._preloaded

    def operator_model(self, ref: str) -> ResolvedModel:
        """A model the operator names (the command line, the chat): a routed or remote name, an
        installed one (a bundled model is installed on first use), or a .gguf path or model folder;
        requests get none of the paths."""
        name = canonical_name(ref)
        return self._remote(name) or resolve_installing(self.store, name, allow_paths=True)

    async def preload(self) -> None:
        """Load the start-up model; /health says 'loading' meanwhile and 'failed' if it could not."""
        if self._preloaded is None:
            return
        try:
            lease = await self.acquire(self._preloaded.name)
            lease.release()
            self.preload_state = "ready"
        except Exception as exc:  # requests may still try to load it later
            self.preload_state, self.preload_error = "failed", str(exc)

    async def close(self) -> None:
        """Unload every model no front end holds: all of them under `serve`, all but the chat's in the UI."""
        for task in list(self._loading.values()):
            try:
                await task
            except Exception:
                pass
        for model in list(self._models.values()):
            if not model.holders:
                await self._unload(model)

    # -- views ----------------------------------------------------------------
    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def engine_stats(self) -> list[EngineStats]:
        return [m.backend.stats() for m in self._models.values()]

    @property
    def loading(self) -> list[str]:
        return list(self._loading)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_change(self) -> None:
        await self._changed.wait()
