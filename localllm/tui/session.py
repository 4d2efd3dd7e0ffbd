"""The model the chat talks to, loaded off the UI thread.

Loading a model takes seconds (and a first `starter` use assembles it), so it
runs on a thread of its own — not Textual's default worker pool, which would
hold the app's exit — and reports back with `post_message`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from textual.message import Message

from localllm.backends.base import Backend
from localllm.core.errors import LocalLLMError
from localllm.store.store import ModelStore


class BackendFactory(Protocol):
    def __call__(self, model: str, context: int | None) -> Backend: ...


def store_factory(store: ModelStore) -> BackendFactory:
    """Open models from `store` (installing the starter on first use) with default options."""

    def factory(model: str, context: int | None) -> Backend:
        from localllm.backends.select import LoadOptions, open_backend
        from localllm.store.bundled import resolve_installing

        return open_backend(resolve_installing(store, model, allow_paths=True), LoadOptions(n_ctx=context))

    return factory


class ModelLoaded(Message):
    def __init__(self, model: str, context: int | None, backend: Backend) -> None:
        super().__init__()
        self.model, self.context, self.backend = model, context, backend


class ModelLoadFailed(Message):
    def __init__(self, model: str, reason: str) -> None:
        super().__init__()
        self.model, self.reason = model, reason


@dataclass
class LoadedModel:
    name: str
    context: int | None
    backend: Backend


class ModelSession:
    """Holds at most one loaded model; swaps it without blocking the UI."""

    def __init__(self, factory: BackendFactory, post: Callable[[Message], object]) -> None:
        self.factory = factory
        self.post = post
        self.current: LoadedModel | None = None
        self.loading: str | None = None

    @property
    def backend(self) -> Backend | None:
        return self.current.backend if self.current else None

    def is_loaded(self, model: str, context: int | None) -> bool:
        return self.current is not None and self.current.name == model and self.current.context == context

    def load(self, model: str, context: int | None) -> None:
        self.loading = model
        threading.Thread(target=self._load, args=(model, context), name=f"load:{model}", daemon=True).start()

    def _load(self, model: str, context: int | None) -> None:
        try:
            backend = self.factory(model, context)
        except LocalLLMError as exc:
            self.post(ModelLoadFailed(model, str(exc)))
        except MemoryError:
            self.post(ModelLoadFailed(model, "out of memory while loading the model"))
        except Exception as exc:  # a UI must never die of a model that fails to load
            self.post(ModelLoadFailed(model, f"{type(exc).__name__}: {exc}"))
        else:
            self.post(ModelLoaded(model, context, backend))

    def adopt(self, loaded: ModelLoaded) -> None:
        """Make a freshly loaded model current; the previous one closes on its own thread."""
        previous = self.current
        self.current = LoadedModel(loaded.model, loaded.context, loaded.backend)
        self.loading = None
        if previous is not None:
            threading.Thread(target=previous.backend.close, daemon=True).start()

    def close(self) -> None:
        if self.current is not None:
            backend, self.current = self.current.backend, None
            closer = threading.Thread(target=backend.close, daemon=True)
            closer.start()
            closer.join(timeout=0.8)  # quitting stays quick even if the engine is mid-step
