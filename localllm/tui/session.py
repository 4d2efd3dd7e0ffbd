"""The model the chat talks to: a hold on the app's model registry, taken off the UI's way.

The registry (localllm.server.registry) is the one owner of loaded models in the
app: the chat holds its model there, and the F5 server, sharing the registry,
serves that same backend instead of loading a second copy. Letting go of a model
(a switch, a new context, quitting) unloads it once no API request runs on it.

Loading takes seconds, so it runs as a task on the app's loop (the backend opens
on a worker thread) and reports back with `post_message`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Protocol

from textual.message import Message

from localllm.backends.base import Backend
from localllm.core.errors import LocalLLMError
from localllm.server.offloop import in_thread
from localllm.server.registry import Lease, ModelRegistry
from localllm.store.store import ResolvedModel


class BackendFactory(Protocol):
    """How the app finds and opens models when not by the registry's own rules (a test's stand-in)."""

    def resolve(self, name: str) -> ResolvedModel: ...

    def open(self, model: ResolvedModel, n_ctx: int | None) -> Backend: ...


class ModelLoaded(Message):
    def __init__(self, model: str, n_ctx: int | None) -> None:
        super().__init__()
        self.model, self.n_ctx = model, n_ctx


class ModelLoadFailed(Message):
    def __init__(self, model: str, reason: str) -> None:
        super().__init__()
        self.model, self.reason = model, reason


@dataclass
class HeldModel:
    name: str
    n_ctx: int | None  # the context the chat asked for (None: the model's default)
    lease: Lease

    @property
    def backend(self) -> Backend:
        return self.lease.backend


class ModelSession:
    """Holds at most one model for the chat; swaps it without blocking the UI."""

    def __init__(
        self, registry: ModelRegistry, resolve: Callable[[str], ResolvedModel], post: Callable[[Message], object]
    ) -> None:
        self.registry = registry
        self.resolve = resolve
        self.post = post
        self.current: HeldModel | None = None
        self.loading: str | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def backend(self) -> Backend | None:
        return self.current.backend if self.current else None

    def is_loaded(self, model: str, n_ctx: int | None) -> bool:
        return self.current is not None and self.current.name == model and self.current.n_ctx == n_ctx

    def load(self, model: str, n_ctx: int | None) -> None:
        self.loading = model
        task = asyncio.get_running_loop().create_task(self._load(model, n_ctx), name=f"load:{model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, model: str, n_ctx: int | None) -> None:
        try:
            if self.current is not None and self.current.name == model:  # a new context: the old one goes first
                await self._let_go()
            resolved = await in_thread(self.resolve, model)
            lease = await self.registry.hold(resolved, n_ctx=n_ctx)
        except LocalLLMError as exc:
            self._failed(model, str(exc))
        except MemoryError:
            self._failed(model, "out of memory while loading the model")
        except Exception as exc:  # a UI must never die of a model that fails to load
            self._failed(model, f"{type(exc).__name__}: {exc}")
        else:
            if self.loading != model:  # another model was asked for meanwhile
                await self._release(HeldModel(model, n_ctx, lease))
                return
            await self._let_go()
            self.current, self.loading = HeldModel(model, n_ctx, lease), None
            self.post(ModelLoaded(model, n_ctx))

    def _failed(self, model: str, reason: str) -> None:
        if self.loading == model:
            self.loading = None
        self.post(ModelLoadFailed(model, reason))

    async def _let_go(self) -> None:
        held, self.current = self.current, None
        if held is not None:
            await self._release(held)

    async def _release(self, held: HeldModel) -> None:
        await self.registry.let_go(held.lease)  # unloaded now if idle, else once the API's requests on it end

    async def close(self) -> None:
        """Let go of the chat's model (deleting it, quitting)."""
        for task in list(self._tasks):
            task.cancel()
        await self._let_go()
